"""Runner for a Hugging Face model directory (merged or base), in torch, float32 by default.

    from formats.hf.runner import HFRunner
    r = HFRunner("merged/"); r.logits(r.tokenize("Hello"))
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from formats.runner import greedy_loop
from lorax_common.files import check_tokenizer_files, read_json_object, weight_files


class HFRunner:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", name: str | None = None, model=None,
                 tokenizer=None, float32_accumulate: bool = True) -> None:
        import torch
        from transformers import AutoTokenizer

        from formats.hf.bf16_compute import accumulate_in_float32
        from formats.hf.load import load_causal_lm

        self.name = name or f"hf:{Path(model_dir).name}"
        self.path = Path(model_dir)
        if tokenizer is None:
            check_tokenizer_files(self.path)  # the error names the broken file, not a bare JSONDecodeError
        if model is None:
            read_json_object(self.path / "config.json", "a Hugging Face model config")
            weight_files(self.path)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
        self.model = model or load_causal_lm(model_dir, dtype)
        self.model.eval()
        # bf16 linear products accumulated in float32 where this CPU has no native bf16 (formats.hf.bf16_compute);
        # False: torch's own kernels (the reference, until its probe against bitsandbytes' path has run)
        if float32_accumulate:
            accumulate_in_float32(self.model)
        self._torch = torch
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.stop = set(eos if isinstance(eos, list) else [eos]) - {None}

    @property
    def float32_accumulate(self) -> bool:
        """Whether the model's bf16 linear products are accumulated in float32 (formats.hf.bf16_compute)."""
        from formats.hf.bf16_compute import accumulating

        return self.model is not None and accumulating(self.model)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)]))
        return out.logits[0].float().numpy()

    def generate(self, ids: Sequence[int], n: int) -> list[int]:
        torch = self._torch
        state: dict = {"past": None}

        def step(new: list[int]) -> np.ndarray:
            with torch.inference_mode():
                # transformers 5 names the KV cache `cache` (past_key_values is deprecated)
                out = self.model(input_ids=torch.tensor([new]), cache=state["past"], use_cache=True)
            state["past"] = out.cache
            return out.logits[0, -1].float().numpy()

        return greedy_loop(step, ids, n, self.stop)

    def close(self) -> None:
        self.model = None

    def __enter__(self) -> HFRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits_batch(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Teacher-forced logits of several rows in one right-padded forward: under the causal mask a real
        token never sees the padding after it, so positions and attention are those of the unpadded row."""
        torch = self._torch
        rows = [list(r) for r in rows]
        width = max(map(len, rows))
        ids = torch.tensor([r + [self._pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask)
        return [out.logits[i, :len(r)].float().numpy() for i, r in enumerate(rows)]

    def generate_batch(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Greedy continuations of several prompts decoded together: left-padded, position ids counted over
        real tokens (a padded row starts at 0 like an unpadded one), one KV cache. Plain argmax, as `generate`:
        no logits processor from the model's generation_config (repetition penalty, ...) takes part."""
        from formats.runner import greedy_batch

        torch = self._torch
        prompts = [list(p) for p in prompts]
        width = max(map(len, prompts))
        state = {"mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]), "cache": None}

        def step(toks) -> np.ndarray:
            if toks is None:
                ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts])
            else:
                ids = torch.as_tensor(toks).reshape(-1, 1)
                state["mask"] = torch.cat([state["mask"], torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            mask = state["mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            with torch.inference_mode():
                # logits_to_keep=1: the prompt's other positions need no vocabulary projection
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=state["cache"],
                                 use_cache=True, logits_to_keep=1)
            state["cache"] = out.cache
            return out.logits[:, -1].float().numpy()

        with contiguous_head_input(self.model):
            return greedy_batch(step, n, len(prompts), self.stop)

    def can_session(self) -> bool:
        """Whether cache_session decodes exactly: not for models with sliding-window attention, where rewound
        rows leave masked columns behind and a window counted in columns would reach less far back."""
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return not (getattr(cfg, "sliding_window", None) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()))

    def cache_session(self, rows: int, cells: int = 0):
        """A KV cache for `rows` rows that decodes from inside teacher-forced logits (formats.hf.session), or
        None where can_session() says no. `cells`: unused (the cache grows with what is fed)."""
        from formats.hf.session import CacheSession

        return CacheSession(self.model, rows, self._pad) if self.can_session() else None

    @property
    def _pad(self) -> int:
        """Any real id works (the mask hides it); the tokenizer's pad token when it has one."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else min(self.stop or {0})


@contextlib.contextmanager
def contiguous_head_input(model):
    """Feed the output projection a contiguous input while decoding. logits_to_keep=1 hands it a strided
    view of the prefill's last position, and torch's CPU linear takes another kernel for a strided bf16 input:
    it rounds differently from the contiguous one every other forward of the model uses (teacher-forced
    logits, decode steps), and it allocates ~1.5 GB for a 49152 x 2048 head (the 1.18B bench reference's
    peak RSS)."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()
