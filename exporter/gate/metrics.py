"""Parity metrics between a reference model and a target, on the same token ids.

Used by `lorax check`, `lorax baseline`, the merge's `--merge-base auto`, and the tests.
Pure numpy, no I/O. Definitions follow ../shared/DESIGN.md (KLD as llama.cpp's
`--kl-divergence`: sum over the vocabulary of p_ref * (log p_ref - log p_target)).

Inputs are teacher-forced logits, shape [positions, vocab], float32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (small KLDs of f32 exports are ~1e-6; float32 sums lose them)."""
    x = np.array(logits, dtype=np.float64)  # a copy of our own: the passes below run in place
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kld_per_position(ref_logits: np.ndarray, tgt_logits: np.ndarray) -> np.ndarray:
    """KL(ref || target) at each position, shape [positions]."""
    _check_shapes(ref_logits, tgt_logits)
    p = log_softmax(ref_logits)
    q = log_softmax(tgt_logits)
    kld = (np.exp(p) * (p - q)).sum(axis=-1)
    # Tiny negative values are rounding; KL is non-negative.
    return np.maximum(kld, 0.0)


def top1_agreement(ref_logits: np.ndarray, tgt_logits: np.ndarray) -> float:
    _check_shapes(ref_logits, tgt_logits)
    return float((ref_logits.argmax(-1) == tgt_logits.argmax(-1)).mean())


def max_abs_logit(ref_logits: np.ndarray, tgt_logits: np.ndarray) -> float:
    _check_shapes(ref_logits, tgt_logits)
    return float(np.abs(np.asarray(ref_logits, np.float64) - np.asarray(tgt_logits, np.float64)).max())


def nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given logits[:-1] (logits[i] predicts ids[i+1])."""
    ids = np.asarray(ids)
    if logits.shape[0] != ids.shape[0]:
        raise ValueError(f"logits cover {logits.shape[0]} positions but there are {ids.shape[0]} ids")
    lp = log_softmax(logits[:-1])
    return -lp[np.arange(len(ids) - 1), ids[1:]]


def perplexity(logits: np.ndarray, ids: Sequence[int]) -> float:
    return float(np.exp(nll(logits, ids).mean()))


def greedy_match(ref_tokens: Sequence[Sequence[int]], tgt_tokens: Sequence[Sequence[int]]) -> float:
    """Share of prompts whose greedy continuations are identical."""
    if len(ref_tokens) != len(tgt_tokens):
        raise ValueError("greedy_match needs one continuation per prompt on both sides")
    if not ref_tokens:
        return float("nan")
    return float(np.mean([list(a) == list(b) for a, b in zip(ref_tokens, tgt_tokens, strict=True)]))


@dataclass(frozen=True)
class Parity:
    """Aggregate parity of a target against the reference over one or more sequences."""

    kld_mean: float
    kld_p99: float
    kld_max: float
    top1: float
    max_abs_logit: float
    ppl_ref: float
    ppl_target: float
    ppl_ratio: float
    positions: int
    ppl_positions: int  # predicted tokens the perplexities cover (those training scores; see compare)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# Positions per pass of _sequence: ~4 MiB of float64 logits. A whole sequence at once (49,152-entry vocabulary,
# 48 positions: 19 MB per temporary) made every temporary fresh zeroed pages under lorax's 8 MiB mmap threshold
# (lorax_common.memory), ~8 of them per sequence; in chunks they come from the heap and stay in cache.
CHUNK_BYTES = 4 << 20


def _sequence(ref: np.ndarray, tgt: np.ndarray, ids: Sequence[int],
              scored: Sequence[bool] | None) -> tuple[np.ndarray, ...]:
    """(KLD per position, top-1 agreement, max |Δlogit|, NLL ref, NLL target) of one sequence, each
    log-softmax computed once (the same numbers as kld_per_position and nll, row by row: every metric is a
    reduction along one position's vocabulary, so computing a few positions at a time changes no bit); the
    NLLs only of the ids `scored` marks (all ids[1:] when None)."""
    _check_shapes(ref, tgt)
    ids = np.asarray(ids)
    if ref.shape[0] != ids.shape[0]:
        raise ValueError(f"logits cover {ref.shape[0]} positions but there are {ids.shape[0]} ids")
    n = len(ids)
    kld = np.empty(n)
    nll_r, nll_t = np.empty(max(n - 1, 0)), np.empty(max(n - 1, 0))
    step = max(1, CHUNK_BYTES // (8 * max(1, ref.shape[-1])))
    for i in range(0, n, step):
        j = min(n, i + step)
        p, q = log_softmax(ref[i:j]), log_softmax(tgt[i:j])
        k = min(j, n - 1) - i  # positions of this chunk that predict a next id
        nxt = ids[i + 1:i + 1 + k]
        nll_r[i:i + k], nll_t[i:i + k] = -p[np.arange(k), nxt], -q[np.arange(k), nxt]
        np.subtract(p, q, out=q)  # q is p - q from here on
        q *= np.exp(p)
        kld[i:j] = np.maximum(q.sum(axis=-1), 0.0)
    rows = np.arange(n - 1)
    if scored is not None:
        if len(scored) != len(ids):
            raise ValueError(f"the scored mask has {len(scored)} entries but there are {len(ids)} ids")
        rows = rows[np.asarray(scored[1:], dtype=bool)]
    return kld, ref.argmax(-1) == tgt.argmax(-1), max_abs_logit(ref, tgt), nll_r[rows], nll_t[rows]


def compare_positions(
    ref: Sequence[np.ndarray], tgt: Sequence[np.ndarray], ids: Sequence[Sequence[int]],
    scored: Sequence[Sequence[bool] | None] | None = None,
) -> tuple[Parity, np.ndarray]:
    """compare(), plus the per-position KLD it pooled (the gate's plot), computed in the same pass."""
    if not (len(ref) == len(tgt) == len(ids)) or not ref:
        raise ValueError("compare needs the same non-zero number of reference, target and id sequences")
    scored = list(scored) if scored is not None else [None] * len(ids)
    if len(scored) != len(ids):
        raise ValueError("compare needs one scored mask (or None) per id sequence")
    # one sequence per core: numpy releases the GIL in these array passes, and sequences are independent
    # (the same numbers as a serial loop)
    with ThreadPoolExecutor(min(len(ref), os.cpu_count() or 1)) as pool:
        parts = list(pool.map(_sequence, ref, tgt, ids, scored))
    klds = np.concatenate([p[0] for p in parts])
    agree = np.concatenate([p[1] for p in parts])
    mal = max(p[2] for p in parts)
    nll_r = np.concatenate([p[3] for p in parts])
    nll_t = np.concatenate([p[4] for p in parts])
    ppl_r, ppl_t = float(np.exp(nll_r.mean())), float(np.exp(nll_t.mean()))
    return Parity(
        kld_mean=float(klds.mean()),
        kld_p99=float(np.percentile(klds, 99)),
        kld_max=float(klds.max()),
        top1=float(agree.mean()),
        max_abs_logit=float(mal),
        ppl_ref=ppl_r,
        ppl_target=ppl_t,
        ppl_ratio=ppl_t / ppl_r,
        positions=int(klds.size),
        ppl_positions=int(nll_r.size),
    ), klds


def compare(
    ref: Sequence[np.ndarray], tgt: Sequence[np.ndarray], ids: Sequence[Sequence[int]],
    scored: Sequence[Sequence[bool] | None] | None = None,
) -> Parity:
    """Parity over several sequences: per-position metrics (KLD, top-1, |Δlogit|) pooled over every
    position; PPL pooled over the predicted tokens `scored` marks per sequence (samples.Sample.scored: the
    tokens training's loss scores), every predicted token of a sequence whose mask is None."""
    return compare_positions(ref, tgt, ids, scored)[0]


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: reference {a.shape} vs target {b.shape}")
