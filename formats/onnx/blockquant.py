"""Block-wise integer weights for onnxruntime's MatMulNBits and GatherBlockQuantized, chosen by weighted search.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int4     # formats/onnx/quantize.py calls these

    from formats.onnx.blockquant import quantize_rows, dequantize, pack_matmul_nbits
    blocks = quantize_rows(w, bits=4, block=32, importance=imx)    # w: [N, K] float32 (output rows, input cols)
    b, scales, zero_points = pack_matmul_nbits(blocks)             # MatMulNBits' B / scales / zero_points

Both ops store a weight as codes 0..2^bits-1 per K-block with one float scale and one integer zero point:
w ≈ (code - zero_point) * scale. onnxruntime's own round-to-nearest picks the block's min/max, which spends
the grid on single outliers; on a QLoRA merge (NF4 levels plus a low-rank delta) that cost SmolLM2 a mean
KLD of 0.7. Here each block tries a range of scales, rounds, refits the scale by least squares and keeps the
candidate with the least error weighted by how large each input column runs on real data (the same
importance matrix llama.cpp's quantizer takes) times the weight's own magnitude (llama.cpp's q4_K weighting).
Integer zero points keep onnxruntime's int8 CPU kernel (accuracy_level 4) usable: float zero points (HQQ)
fall back to a float kernel that decoded 7x slower than float32.

Pure functions on torch tensors (vectorised over all blocks of a weight; no graph, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Scale candidates per block, by bit width: the min/max scale times each factor (1.0 is round-to-nearest).
# 8 bits leave little to search (the demo's KLD 0.0083 either way), so they only get the least-squares refit.
FACTORS = {4: tuple(np.round(np.linspace(0.70, 1.10, 21), 3)), 8: (1.0,)}
_ROWS_PER_CHUNK = 1 << 16  # blocks handled at once (bounds the search's temporaries to a few hundred MB)


@dataclass(frozen=True)
class Blocks:
    """A weight [N, K] as codes [N, K/block, block] (uint8 values < 2^bits), scales and zero points [N, K/block]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        n, nb, blk = self.codes.shape
        return n, nb * blk


def weigh(x: torch.Tensor, importance: torch.Tensor | None, sigma2: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element error weight: column importance x sqrt(row scale² + x²); |x| + mean|x| without importance.
    `sigma2` [R, 1]: the row scale² when x is a slice of the rows (default: 2 mean x² over x's own row)."""
    if importance is None:
        return x.abs() + x.abs().mean(dim=1, keepdim=True)
    if sigma2 is None:
        sigma2 = row_sigma2(x)
    return importance * torch.sqrt(sigma2 + x * x)


def row_sigma2(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * (x * x).mean(dim=1, keepdim=True)


def _fit(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmax: int):
    """Round x [R, B] on (scale, zp); refit the scale to those codes by weighted least squares and round again.
    Returns whichever of the two (codes, scale) loses less, with its weighted error."""
    def err_of(codes, s):
        return (w * (x - (codes - zp) * s) ** 2).sum(1, keepdim=True)

    codes = torch.clamp(torch.round(x / scale + zp), 0, qmax)
    centred = codes - zp
    den = (w * centred * centred).sum(1, keepdim=True)
    refit = torch.where(den > 0, (w * centred * x).sum(1, keepdim=True) / den.clamp_min(1e-30), scale)
    refit = torch.where(refit.abs() > 0, refit, scale)
    recoded = torch.clamp(torch.round(x / refit + zp), 0, qmax)  # a smaller scale can clip the block's peak
    err0, err1 = err_of(codes, scale), err_of(recoded, refit)
    better = err1 < err0
    return torch.where(better, recoded, codes), torch.where(better, refit, scale), torch.minimum(err0, err1)


def search_blocks(x: torch.Tensor, w: torch.Tensor, bits: int, symmetric: bool):
    """Best (codes, scale, zero point) per row of x [R, B] over FACTORS."""
    qmax = (1 << bits) - 1
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:  # zero point fixed at 2^(bits-1): the grid is [-2^(bits-1), 2^(bits-1) - 1] * scale
        half = float(1 << (bits - 1))
        idx = x.abs().argmax(1, keepdim=True)
        peak = x.gather(1, idx)  # signed: the largest magnitude lands on the grid's longer (negative) end
        base = torch.where(peak != 0, peak / -half, torch.full_like(peak, tiny))
        zp_of = lambda s: torch.full_like(s, half)  # noqa: E731
    else:
        # an integer zero point puts 0.0 on the grid, so the range a block can use always contains 0
        lo = x.min(1, keepdim=True).values.clamp(max=0.0)
        hi = x.max(1, keepdim=True).values.clamp(min=0.0)
        span = hi - lo
        base = torch.where(span > 0, span / qmax, torch.full_like(span, tiny))
        zp_of = lambda s: torch.clamp(torch.round(-lo / s), 0, qmax)  # noqa: E731
    best = None
    for f in FACTORS[bits]:
        scale = base * float(f)
        zp = zp_of(scale)
        codes, refit, err = _fit(x, w, scale, zp, qmax)
        if best is None:
            best = [codes, refit, zp, err]
            continue
        better = err < best[3]
        best = [torch.where(better, codes, best[0]), torch.where(better, refit, best[1]),
                torch.where(better, zp, best[2]), torch.where(better, err, best[3])]
    return best[0], best[1], best[2]


def quantize_rows(w: torch.Tensor | np.ndarray, bits: int, block: int, importance=None,
                  symmetric: bool = False) -> Blocks:
    """Quantize w [N, K] (N output rows, blocks run along K) to `bits` with one scale and zero point per block.

    `importance` [K] (mean x² of each input column on calibration text) weighs the rounding error; None
    weighs by magnitude alone. K must be a multiple of `block` (callers pad or leave such weights float).
    """
    x = torch.as_tensor(np.asarray(w, dtype=np.float32) if not torch.is_tensor(w) else w, dtype=torch.float32)
    n, k = x.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    nb = k // block
    imp = None
    if importance is not None:
        imp = torch.as_tensor(np.asarray(importance, dtype=np.float32)).reshape(1, k)
        imp = imp.clamp_min(float(imp.mean()) * 1e-6 + 1e-30)  # a dead column still counts a little
    codes = torch.empty(n * nb, block, dtype=torch.uint8)
    scales = torch.empty(n * nb, dtype=torch.float32)
    zps = torch.empty(n * nb, dtype=torch.uint8)
    rows_per = max(1, _ROWS_PER_CHUNK // nb)
    for r0 in range(0, n, rows_per):
        xs = x[r0:r0 + rows_per]
        weight = weigh(xs, imp.expand_as(xs) if imp is not None else None)
        xb, wb = xs.reshape(-1, block), weight.reshape(-1, block)
        c, s, z = search_blocks(xb, wb, bits, symmetric)
        sl = slice(r0 * nb, r0 * nb + xb.shape[0])
        codes[sl], scales[sl], zps[sl] = c.to(torch.uint8), s.reshape(-1), z.reshape(-1).to(torch.uint8)
    return Blocks(codes.reshape(n, nb, block), scales.reshape(n, nb), zps.reshape(n, nb), bits)


def dequantize(blocks: Blocks) -> torch.Tensor:
    """The float32 [N, K] weight the runtime computes with."""
    n, k = blocks.shape
    vals = (blocks.codes.float() - blocks.zero_points.float()[..., None]) * blocks.scales[..., None]
    return vals.reshape(n, k)


def pack_codes(codes: torch.Tensor, bits: int) -> np.ndarray:
    """Codes [..., K'] as bytes, low nibble first for 4 bits (both ops' layout)."""
    c = codes.numpy().astype(np.uint8)
    if bits == 8:
        return c
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def pack_matmul_nbits(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, nb, block*bits/8], scales [N*nb] and zero points (4 bits: two per byte per row)."""
    n, nb, _ = blocks.codes.shape
    b = pack_codes(blocks.codes, blocks.bits)
    zp = blocks.zero_points.numpy().astype(np.uint8)
    if blocks.bits == 4:
        if nb % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
    return b, blocks.scales.numpy().reshape(-1).astype(np.float32), zp.reshape(-1)


def pack_gather(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GatherBlockQuantized's data [N, K*bits/8], scales [N, nb] and zero points (packed like the data)."""
    n, nb, blk = blocks.codes.shape
    data = pack_codes(blocks.codes.reshape(n, nb * blk), blocks.bits)
    zp = blocks.zero_points
    if blocks.bits == 4:
        if nb % 2:
            zp = torch.cat([zp, torch.zeros(n, 1, dtype=torch.uint8)], 1)
        zp = torch.as_tensor(pack_codes(zp, 4))
    return data, blocks.scales.numpy().astype(np.float32), zp.numpy().astype(np.uint8)
