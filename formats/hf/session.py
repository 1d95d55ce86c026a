"""One batch's KV cache in which every row keeps its own live prefix: teacher-forced logits, then greedy
decoding from inside them, with no second prefill.

    s = CacheSession(model, rows=2, pad=0)
    s.feed([prompt_a + answer_a, prompt_b + answer_b])    # teacher-forced logits of both rows
    s.keep(0, len(prompt_a)); s.keep(1, len(prompt_b))    # rewind each row to its prompt
    s.feed([[tok_a], [tok_b]])                            # the next step, as if the prompts had been prefilled

The gate runs each sample's ids (prompt + reference answer) teacher-forced and then decodes from the prompt;
decoding after a separate prefill computes the prompt a second time. Here the cache columns past a row's
kept prefix are masked out instead of removed (rows rewind to different lengths), new tokens are appended
after the last column, and position ids count each row's live tokens: every live token sees exactly the
tokens and positions it would see in a cache holding only its row's prefix. Masked columns add exact zeros
to the attention sums, so a result can differ from a fresh prefill only in the last bits of a sum's order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class CacheSession:
    def __init__(self, model, rows: int, pad: int) -> None:
        import torch

        self._torch, self.model, self.rows, self.pad = torch, model, rows, pad
        self.cache = None
        self.mask = torch.zeros(rows, 0, dtype=torch.long)
        self.live: list[list[int]] = [[] for _ in range(rows)]  # cache columns of each row's prefix, in order

    def feed(self, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Append `tokens[r]` (any count, zero included) to each row; their logits [len, vocab] per row."""
        torch = self._torch
        width = max((len(t) for t in tokens), default=0)
        if width == 0:
            return [np.zeros((0, 0), np.float32) for _ in tokens]
        base = self.mask.shape[1]
        ids = torch.tensor([list(t) + [self.pad] * (width - len(t)) for t in tokens])
        new = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens])
        positions = torch.tensor([[len(self.live[r]) + min(k, max(len(t) - 1, 0)) for k in range(width)]
                                  for r, t in enumerate(tokens)])
        self.mask = torch.cat([self.mask, new], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                             use_cache=True)
        self.cache = out.cache
        for r, t in enumerate(tokens):
            self.live[r] += range(base, base + len(t))
        return [out.logits[r, :len(t)].float().numpy() for r, t in enumerate(tokens)]

    def close(self) -> None:
        self.cache = None

    def keep(self, row: int, n: int) -> None:
        """Rewind `row` to the first `n` tokens of its prefix."""
        dropped, self.live[row] = self.live[row][n:], self.live[row][:n]
        if dropped:
            self.mask[row, dropped] = 0
