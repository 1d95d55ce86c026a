"""Per-block clipping of MatMul weights that minimizes 4-bit round-to-nearest error (numpy only).

    from formats.onnx.clip import clip_blocks
    w = clip_blocks(w, block_size=32, bits=4)     # w: [K, N] float32, blocks of K per column

onnxruntime's asymmetric RTN kernel (`quantize_matmul_4bits`) maps each block's [min, max] onto
0..15 with an integer zero point -- the form its int8-activation MatMulNBits kernel runs fast -- but
one outlier stretches the whole block's step. Shrinking a block's range first (values beyond it are
clamped) trades a larger error on the outlier for a finer step on the other 31 values; per block we
keep the shrink (from RATIOS) with the least squared error against the original weights. The kernel
then quantizes the clipped block, whose min/max are exactly the chosen range. The same idea as
llama.cpp's scale search for its q4 types, done once per block over a fixed grid.
"""

from __future__ import annotations

import numpy as np

# Fractions of the block's own [min, max] to try (1.0 = plain RTN, always a candidate).
RATIOS = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))


def _rtn_error(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """Squared error per block of asymmetric RTN over [lo, hi] (ranges include 0, as the kernel's do)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / levels
    safe = np.where(scale == 0, 1.0, scale)
    zero = np.clip(np.round(-lo / safe), 0, levels)
    q = np.clip(np.round(blocks / safe[..., None]) + zero[..., None], 0, levels)
    return (((q - zero[..., None]) * safe[..., None] - blocks) ** 2).sum(-1)


def clip_blocks(w: np.ndarray, block_size: int = 32, bits: int = 4) -> np.ndarray:
    """`w` [K, N] with each (column, K-block) clamped to its least-error shrunken range."""
    k, n = w.shape
    pad = (-k) % block_size
    wt = np.pad(w, ((0, pad), (0, 0))).T.reshape(n, -1, block_size).astype(np.float32)  # [N, blocks, B]
    lo0, hi0 = wt.min(-1), wt.max(-1)
    levels = 2**bits - 1
    best_err = np.full(lo0.shape, np.inf, dtype=np.float32)
    best = np.ones(lo0.shape, dtype=np.float32)
    for r in RATIOS:
        err = _rtn_error(wt, lo0 * r, hi0 * r, levels)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, r, best)
    clipped = np.clip(wt, (lo0 * best)[..., None], (hi0 * best)[..., None])
    return clipped.reshape(n, -1).T[:k].astype(w.dtype)
