"""The protocol every format's runner implements, so the parity gate can treat them alike.

A runner is a loaded artifact. The gate feeds every runner the *same* token ids (from the
reference tokenizer) and compares teacher-forced logits; `tokenize` exists so the gate can
check that a runner's own tokenizer would have produced those ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    name: str

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids the artifact's own tokenizer gives for `text` (special tokens in the text are parsed)."""
        ...

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits, shape [len(ids), vocab], float32: row i predicts ids[i + 1]."""
        ...

    def generate(self, ids: Sequence[int], n: int) -> list[int]:
        """Up to `n` greedy new tokens after `ids`; stops after an end-of-generation token."""
        ...

    def close(self) -> None:
        """Free the loaded artifact now (the gate holds one at a time: peak memory is one artifact)."""
        ...


def greedy_loop(step, ids: Sequence[int], n: int, stop: set[int]) -> list[int]:
    """Greedy decoding shared by runners: `step(new_ids)` feeds tokens and returns last-position logits."""
    out: list[int] = []
    logits = step(list(ids))
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        if tok in stop:
            break
        logits = step([tok])
    return out
