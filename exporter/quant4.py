"""Exact NF4/FP4 round trip, bit-identical to bitsandbytes on CPU, several times faster.

    from exporter.quant4 import Quant4Spec, round_trip
    w_trained = round_trip(w, Quant4Spec("nf4", blocksize=64, double_quant=True))

Serves `lorax merge --merge-base quantized`: a QLoRA adapter was trained on top of
dequant(quant4(W)), not on W, so the merge re-creates exactly that weight before folding the adapter in.

What bitsandbytes 0.50 does on CPU (and what this module reproduces bit for bit):
  quantize   A = W.to(load dtype).float(); per block of `blocksize`: absmax = max|A|;
             s = clamp(A * (1 / max(absmax, 1e-38)), -1, 1); q = bucketize(s, midpoints of the sorted code)
  double q.  absmax - mean(absmax) is 8-bit quantized in blocks of 256 with the dynamic map
  dequant    code[q] * absmax (float32), absmax first dequantized (+ mean) when double-quantized
Speed: `torch.bucketize` (a binary search per element) dominates bnb's cost. Here a table over 2K+2 equal
cells of [-1, 1] gives each element its code index with one lookup and one exact comparison: the cells are
so narrow that at most one code midpoint lies inside a cell (checked when the table is built), so
q = base[cell] + (s > midpoint[cell]) is exactly bucketize's answer, whatever rounding put s in that cell.
Work runs over L2-sized chunks with buffers reused between chunks: touching fresh pages for full-size
temporaries cost more than the arithmetic itself. The 8-bit double quantization of the absmax vector (1/64
of the data) is left to bitsandbytes' own C kernel: it is already fast, and exact by definition.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bnb's double quantization always uses blocks of 256 absmax values
_CELLS = 4096  # cells per unit of s; FP4's closest midpoints are 0.0026 apart, 3 cells span 0.0007
_CHUNK = 1 << 18  # elements per chunk: ~1 MiB float32 buffers stay in cache


@dataclass(frozen=True)
class Quant4Spec:
    """How the base weights were quantized in training (lorax.json's `quantization` block)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    # dtype the weight was cast to before bnb quantized it (transformers casts to the load dtype first)
    input_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"invalid 4-bit blocksize {self.blocksize}")


@dataclass(frozen=True)
class _Tables:
    code: torch.Tensor  # the 16 code values, in packed-index order (what the CPU dequant kernel returns)
    order: torch.Tensor  # sorted position -> packed index
    sorted_code: torch.Tensor
    bounds: torch.Tensor  # midpoints between consecutive sorted code values (bnb's bucketize boundaries)
    cell_base: torch.Tensor  # int32 per cell: midpoints surely below every s in the cell
    cell_thr: torch.Tensor  # float32 per cell: the one midpoint inside the cell, or +inf


@functools.cache
def tables(quant_type: str) -> _Tables:
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type(quant_type, device="cpu").float()
    # Same expressions as bitsandbytes' CPU quantizer, so ties (FP4 has +0 and -0) resolve the same way.
    order = torch.argsort(code)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    n = 2 * _CELLS + 2
    i = torch.arange(n, dtype=torch.float64)
    # Cell i holds s with (s + 1) * K in [i, i + 1) up to float32 rounding; widen by a whole cell each side.
    lo, hi = (i - 1) / _CELLS - 1, (i + 2) / _CELLS - 1
    b = bounds.double()
    below = (b[None, :] < lo[:, None]).sum(1)
    inside = (b[None, :] <= hi[:, None]).sum(1) - below
    if int(inside.max()) > 1:
        raise AssertionError("4-bit cell table too coarse: two code midpoints share a cell")
    thr = torch.full((n,), float("inf"), dtype=torch.float32)
    thr[inside == 1] = bounds[below[inside == 1]]
    return _Tables(code, order, sorted_code, bounds, below.to(torch.int32), thr)


def _check_dtype(w: torch.Tensor, spec: Quant4Spec) -> None:
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"4-bit quantization needs a float tensor, got {w.dtype}")


def _full_blocks(n: int, blocksize: int) -> int:
    return n - n % blocksize


def _codes_and_absmax(w: torch.Tensor, spec: Quant4Spec, out: torch.Tensor | None, want_q: bool):
    """Pass 1 over `w`: per-block absmax, and per element either the sorted code value or the sorted index."""
    t = tables(spec.quant_type)
    flat = w.reshape(-1)
    n, bs = flat.numel(), spec.blocksize
    full = _full_blocks(n, bs)
    absmax = torch.empty(-(n // -bs), dtype=torch.float32)
    vals = out.reshape(-1) if out is not None else torch.empty(n, dtype=torch.float32)
    q_all = torch.empty(n, dtype=torch.int32) if want_q else None
    chunk = max(bs, _CHUNK - _CHUNK % bs)
    a = torch.empty(chunk, dtype=torch.float32)
    cell = torch.empty(chunk, dtype=torch.int32)
    thr = torch.empty(chunk, dtype=torch.float32)
    gt = torch.empty(chunk, dtype=torch.bool)
    q = torch.empty(chunk, dtype=torch.int32)
    amin = torch.empty(chunk // bs, dtype=torch.float32)
    for start in range(0, full, chunk):
        m = min(chunk, full - start)
        blocks = m // bs
        src = flat[start:start + m]
        ab, cb = a[:m], cell[:m]
        ab.copy_(src.to(spec.input_dtype) if src.dtype != spec.input_dtype else src)
        am = absmax[start // bs:start // bs + blocks]
        torch.amax(ab.view(blocks, bs), dim=1, out=am)
        torch.amin(ab.view(blocks, bs), dim=1, out=amin[:blocks])
        torch.maximum(am, amin[:blocks].neg_(), out=am)
        if not bool(torch.isfinite(am).all()):
            raise ValueError("weight contains NaN or Inf")
        inv = 1.0 / am.clamp(min=1e-38)
        s = ab.view(blocks, bs).mul_(inv[:, None]).view(-1)  # bnb's s, before its (here unneeded) clamp
        # Cell index ~ (s + 1) * K; any rounding is absorbed by the widened cells (see tables()).
        torch.mul(s, float(_CELLS), out=thr[:m]).add_(float(_CELLS))
        cb.copy_(thr[:m])
        torch.index_select(t.cell_thr, 0, cb, out=thr[:m])
        torch.gt(s, thr[:m], out=gt[:m])
        qb = q_all[start:start + m] if q_all is not None else q[:m]
        torch.index_select(t.cell_base, 0, cb, out=qb)
        qb.add_(gt[:m])
        torch.index_select(t.sorted_code, 0, qb, out=vals[start:start + m])
    if full < n:  # a last partial block: bnb divides instead of multiplying by the reciprocal
        rest = flat[full:].to(spec.input_dtype).float()
        am = rest.abs().max().clamp(min=1e-38)
        if not bool(torch.isfinite(am)):
            raise ValueError("weight contains NaN or Inf")
        absmax[-1] = am
        qr = torch.bucketize(torch.clamp(rest / am, -1, 1), t.bounds, out_int32=True)
        vals[full:] = t.sorted_code[qr]
        if q_all is not None:
            q_all[full:] = qr
    return vals, absmax, q_all


@dataclass
class Quantized:
    """The quantized weight in bitsandbytes' layout (what `Params4bit` holds after quantization)."""

    packed: torch.Tensor  # uint8 [(n + 1) // 2, 1]: two codes per byte, first element in the high nibble
    absmax: torch.Tensor  # float32 per block, or uint8 when double-quantized
    offset: torch.Tensor | None  # double quant: mean of the absmax vector
    nested_absmax: torch.Tensor | None  # double quant: float32 per block of 256 absmax values
    nested_code: torch.Tensor | None
    shape: torch.Size
    spec: Quant4Spec


def _nested(absmax: torch.Tensor):
    """Double quantization of the absmax vector, by bitsandbytes itself (small; see module docstring)."""
    import bitsandbytes.functional as bnbf

    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    deq = torch.ops.bitsandbytes.dequantize_blockwise.default(
        qabsmax, state2.absmax, state2.code, NESTED_BLOCKSIZE, torch.float32) + offset
    return deq, qabsmax, offset, state2


def effective_absmax(absmax: torch.Tensor, spec: Quant4Spec) -> torch.Tensor:
    """The per-block scale the dequantizer multiplies by (the absmax itself, or its 8-bit round trip)."""
    return _nested(absmax)[0] if spec.double_quant else absmax


def round_trip(w: torch.Tensor, spec: Quant4Spec, out: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(w)) in float32, bit-identical to bitsandbytes' CPU kernels (as the model used it)."""
    _check_dtype(w, spec)
    vals, absmax, _ = _codes_and_absmax(w, spec, out, want_q=False)
    scale = effective_absmax(absmax, spec)
    n, bs = vals.numel(), spec.blocksize
    full = _full_blocks(n, bs)
    step = max(bs, _CHUNK - _CHUNK % bs)
    for start in range(0, full, step):  # chunked so the scale multiply runs in cache too
        m = min(step, full - start)
        vals[start:start + m].view(-1, bs).mul_(scale[start // bs:(start + m) // bs, None])
    if full < n:
        vals[full:] *= scale[-1]
    return vals.view(w.shape)


def quantize(w: torch.Tensor, spec: Quant4Spec) -> Quantized:
    """Quantize `w` into bitsandbytes' packed layout (for verification against bnb, and for tests)."""
    _check_dtype(w, spec)
    t = tables(spec.quant_type)
    _, absmax, q = _codes_and_absmax(w, spec, None, want_q=True)
    codes = t.order.to(torch.uint8)[q.long()]
    if codes.numel() % 2:
        # bnb pads the scaled values with a 0 before packing: the pad gets the code of 0.
        pad = t.order[torch.bucketize(torch.zeros(1), t.bounds)].to(torch.uint8)
        codes = torch.cat([codes, pad])
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    if not spec.double_quant:
        return Quantized(packed, absmax, None, None, None, w.shape, spec)
    _, qabsmax, offset, state2 = _nested(absmax)
    return Quantized(packed, qabsmax, offset, state2.absmax, state2.code, w.shape, spec)


def dequantize(qw: Quantized) -> torch.Tensor:
    """float32 weights from a `Quantized` (same arithmetic as bnb's CPU dequantize: code * scale)."""
    spec = qw.spec
    t = tables(spec.quant_type)
    hi, lo = qw.packed.view(-1) >> 4, qw.packed.view(-1) & 0xF
    idx = torch.stack([hi, lo], dim=1).view(-1)[: qw.shape.numel()].long()
    vals = t.code[idx]
    if spec.double_quant:
        scale = torch.ops.bitsandbytes.dequantize_blockwise.default(
            qw.absmax, qw.nested_absmax, qw.nested_code, NESTED_BLOCKSIZE, torch.float32) + qw.offset
    else:
        scale = qw.absmax
    n, bs = vals.numel(), spec.blocksize
    full = _full_blocks(n, bs)
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (vals[:full].view(-1, bs) * scale[: full // bs, None]).view(-1)
    if full < n:
        out[full:] = vals[full:] * scale[-1]
    return out.view(qw.shape)
