"""The protocol every format's runner implements, so the parity gate can treat them alike.

A runner is a loaded artifact. The gate feeds every runner the *same* token ids (from the
reference tokenizer) and compares teacher-forced logits; `tokenize` exists so the gate can
check that a runner's own tokenizer would have produced those ids. The gate calls the batch
methods (`logits_batch`, `generate_batch`) with groups planned by `plan_batches`; each runner
batches the way its runtime does (torch and onnxruntime: padded tensors; llama.cpp: one
sequence id per row), and returns what the one-row methods would, within the runtime's own
rounding (tests/test_batched_eval.py measures it per runner).
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

    def logits_batch(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """`logits(row)` for each row, computed together."""
        ...

    def generate_batch(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """`generate(prompt, n)` for each prompt, decoded together (each stops at its own end token)."""
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


def greedy_batch(step, n: int, rows: int, stop: set[int]) -> list[list[int]]:
    """Greedy decoding of `rows` sequences at once. `step(None)` runs the prompts and returns last-position
    logits [rows, vocab]; `step(tokens)` feeds one new token per row (finished rows too: their outputs are
    ignored) and returns the next logits. Each row is cut after its first stop token, as `greedy_loop` does."""
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    logits = step(None)
    for i in range(n):
        toks = np.asarray(logits).argmax(-1)
        for r, t in enumerate(toks.tolist()):
            if not done[r]:
                out[r].append(int(t))
                done[r] = int(t) in stop
        if all(done) or i == n - 1:
            break
        logits = step(toks)
    return out


# Bytes of activations one batch may take (logits dominate: rows x width x vocab x 4), as a share of the
# memory free when the gate starts, and never more than this cap: past it batching gains no speed on a CPU.
BATCH_MEMORY_SHARE = 0.25
BATCH_MEMORY_CAP = 2 * 1024**3
MAX_BATCH_ROWS = 16


def plan_batches(lengths: Sequence[int], vocab: int, budget_bytes: int,
                 max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Group row indices into batches: rows of similar length together (little padding), each batch's padded
    float32 logits within `budget_bytes`, at most `max_rows` rows; every row in exactly one batch. Pure."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[i]  # sorted ascending: the newest row is the widest of the batch
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * width * vocab * 4 > budget_bytes):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def batch_budget() -> int:
    """Activation bytes a batch may use now: a share of the memory free (psutil), capped."""
    import psutil

    return int(min(BATCH_MEMORY_CAP, psutil.virtual_memory().available * BATCH_MEMORY_SHARE))
