"""Exact NF4/FP4 round trip, bit-identical to bitsandbytes on CPU, several times faster.

    from exporter.merge.quant4 import Quant4Spec, round_trip
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
temporaries cost more than the arithmetic itself. The 8-bit double quantization of the absmax vector
lives in exporter.merge.quant4_nested.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Imported now, not lazily: it records this process's torch thread count before any merge narrows it.
from exporter.merge.quant4_nested import dequantize_nested, double_quantize

QUANT_TYPES = ("nf4", "fp4")
_CELLS = 4096  # cells per unit of s; FP4's closest midpoints are 0.0026 apart, 3 cells span 0.0007
_CHUNK = 1 << 18  # elements per chunk: ~1 MiB float32 buffers stay in cache
_CELLS_T = torch.tensor(float(_CELLS))


@dataclass(frozen=True)
class Quant4Spec:
    """How the base weights were quantized in training (lorax.json's `quantization` block)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    # dtype the weight was cast to before bnb quantized it (transformers casts to the load dtype first)
    input_dtype: torch.dtype = torch.float32
    # torch threads of the process that quantized: double quant's mean(absmax) is a torch reduction whose
    # last bit depends on the thread count beyond ~1M blocks (a 64M-element weight). None: this process's.
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"invalid 4-bit blocksize {self.blocksize}")


@dataclass(frozen=True)
class _Tables:
    code_generic: torch.Tensor  # the same values as get_4bit_type has them (FP4: +0.0 where the kernel has -0.0)
    order: torch.Tensor  # sorted position -> packed index
    sorted_code_generic: torch.Tensor
    bounds: torch.Tensor  # midpoints between consecutive sorted code values (bnb's bucketize boundaries)
    cell_base: torch.Tensor  # int32 per cell: midpoints surely below every s in the cell
    cell_thr: torch.Tensor  # float32 per cell: the one midpoint inside the cell, or +inf


@functools.cache
def tables(quant_type: str) -> _Tables:
    import bitsandbytes.functional as bnbf

    qcode = bnbf.get_4bit_type(quant_type, device="cpu")
    # Same expressions as bitsandbytes' quantizer, so ties (FP4 has two zeros) resolve the same way.
    order = torch.argsort(qcode)
    sorted_qcode = qcode[order]
    bounds = (sorted_qcode[:-1] + sorted_qcode[1:]) / 2
    sorted_code_generic = qcode.float()[order]
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
    return _Tables(qcode.float(), order, sorted_code_generic, bounds, below.to(torch.int32), thr)


def _uses_generic_kernel(shape: torch.Size, blocksize: int) -> bool:
    """Whether bnb's CPU dequantize falls back to its torch path, whose FP4 zero is +0.0 (bnb 0.50 rules)."""
    odd = len(shape) > 0 and shape[-1] % 2 != 0
    return odd or (torch.backends.cpu.get_cpu_capability() == "AVX512" and blocksize >= 2048)


def _values(spec: Quant4Spec, shape: torch.Size, sorted_order: bool) -> torch.Tensor:
    t = tables(spec.quant_type)
    if _uses_generic_kernel(shape, spec.blocksize):
        return t.sorted_code_generic if sorted_order else t.code_generic
    code = _kernel_code(spec.quant_type, shape[-1] if len(shape) else 1, spec.blocksize)
    return code[t.order] if sorted_order else code


@functools.cache
def _kernel_code(quant_type: str, row: int, blocksize: int) -> torch.Tensor:
    """The 16 code values as bnb's CPU dequantize kernel returns them for rows of `row` elements.

    They come from the kernel itself: its FP4 table has -0.0 where get_4bit_type has +0.0, and the trained
    model saw the kernel's. Which zero depends on the kernel's path: on AVX-512, rows whose length is a
    multiple of 16 take a vector path that gives +0.0, others -0.0 (bnb 0.50, measured); so probe one row
    of the real length, and refuse a row whose values are not the same at every position."""
    every_code = torch.arange(16, dtype=torch.uint8)
    n = row + row % 2
    codes = every_code.repeat(-(-n // 16))[:n]
    packed = (codes[0::2] << 4) | codes[1::2]
    out = torch.ops.bitsandbytes.dequantize_4bit.default(packed, torch.ones(-(-n // blocksize)), blocksize,
                                                         quant_type, (1, n), torch.float32).view(-1)
    table = torch.empty(16, dtype=torch.float32)
    for c in range(16):
        vals = out[codes == c]
        if not torch.equal(vals.view(torch.int32), vals[:1].expand_as(vals).contiguous().view(torch.int32)):
            raise AssertionError(f"bnb's {quant_type} dequantize kernel gives code {c} more than one value "
                                 f"within a row of {row}; lorax's exact 4-bit round trip cannot follow it")
        table[c] = vals[0]
    return table


def _check_dtype(w: torch.Tensor) -> None:
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"4-bit quantization needs a float tensor, got {w.dtype}")


def _full_blocks(n: int, blocksize: int) -> int:
    return n - n % blocksize


@contextlib.contextmanager
def single_threaded_ops():
    """Run torch ops single-threaded inside; parallelism comes from our own worker threads instead.

    Per-op OpenMP fork/join across both cores cost more than the work on chunk-sized ops, and on a
    shared, busy machine one descheduled OpenMP thread stalls every op (measured 0.2x bnb's speed).
    """
    from lorax_common.scoped import torch_threads

    with torch_threads(1) as n:
        yield n


class _Workspace:
    """Per-thread chunk buffers, reused across chunks (fresh full-size temporaries page-fault)."""

    def __init__(self, chunk: int, bs: int) -> None:
        self.a = torch.empty(chunk, dtype=torch.float32)
        self.f = torch.empty(chunk, dtype=torch.float32)
        self.cell = torch.empty(chunk, dtype=torch.int32)
        self.q = torch.empty(chunk, dtype=torch.int32)
        self.gt = torch.empty(chunk, dtype=torch.bool)
        self.amin = torch.empty(chunk // bs, dtype=torch.float32)


def _absmax_chunk(src: torch.Tensor, spec: Quant4Spec, ws: _Workspace, absmax: torch.Tensor) -> torch.Tensor:
    """Cast one chunk of whole blocks as bnb did (into ws.a) and write its per-block absmax."""
    m, bs = src.numel(), spec.blocksize
    blocks = m // bs
    a = ws.a[:m]
    a.copy_(src if src.dtype == spec.input_dtype else src.to(spec.input_dtype))
    torch.amax(a.view(blocks, bs), dim=1, out=absmax)
    torch.amin(a.view(blocks, bs), dim=1, out=ws.amin[:blocks])
    # max(amax, -amin) == max|a| without an abs pass; + 0.0 turns an all-zero block's -0 into bnb's +0
    torch.maximum(absmax, ws.amin[:blocks].neg_(), out=absmax).add_(0.0)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("weight contains NaN or Inf")
    return a


def _chunk(src: torch.Tensor, spec: Quant4Spec, ws: _Workspace, absmax: torch.Tensor, vals: torch.Tensor,
           q_out: torch.Tensor | None, scale: torch.Tensor | None, values: torch.Tensor) -> None:
    """Quantize one chunk of whole blocks: absmax per block, code values, times `scale` when given."""
    t = tables(spec.quant_type)
    m, bs = src.numel(), spec.blocksize
    a = _absmax_chunk(src, spec, ws, absmax)
    f, cell, gt = ws.f[:m], ws.cell[:m], ws.gt[:m]
    s = a.view(m // bs, bs).mul_((1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)  # bnb's s (clamp not needed)
    # Cell index ~ (s + 1) * K; any rounding here is absorbed by the widened cells (see tables()).
    torch.add(_CELLS_T, s, alpha=float(_CELLS), out=f)
    cell.copy_(f)
    torch.index_select(t.cell_thr, 0, cell, out=f)
    torch.gt(s, f, out=gt)
    q = q_out if q_out is not None else ws.q[:m]
    torch.index_select(t.cell_base, 0, cell, out=q)
    q.add_(gt)
    torch.index_select(values, 0, q, out=vals)
    if scale is not None:
        vals.view(m // bs, bs).mul_(scale[:, None])


_local = threading.local()


@contextlib.contextmanager
def serial():
    """Inside, this thread's quant4 calls run inline (for callers that spread work over cores themselves)."""
    before = getattr(_local, "serial", False)
    _local.serial = True
    try:
        yield
    finally:
        _local.serial = before


def _parallel(n_items: int, fn) -> None:
    """fn(start, stop) over contiguous stripes of range(n_items), one stripe per core."""
    if getattr(_local, "serial", False):
        fn(0, n_items)
        return
    with single_threaded_ops() as cores:
        workers = max(1, min(cores, n_items))
        bounds = [n_items * i // workers for i in range(workers + 1)]
        if workers == 1:
            fn(0, n_items)
            return
        with ThreadPoolExecutor(workers) as ex:  # torch kernels release the GIL
            for fut in [ex.submit(fn, bounds[i], bounds[i + 1]) for i in range(workers)]:
                fut.result()


def _chunks(n: int, bs: int) -> tuple[int, int, int]:
    """(elements in whole blocks, chunk length, number of chunks) for a tensor of n elements."""
    full = _full_blocks(n, bs)
    chunk = max(bs, _CHUNK - _CHUNK % bs)
    return full, chunk, -(full // -chunk)


def _partial_block(rest: torch.Tensor, spec: Quant4Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax, sorted index) of a last partial block: bnb divides here instead of multiplying."""
    t = tables(spec.quant_type)
    rest = rest.to(spec.input_dtype).float()
    am = rest.abs().max().clamp(min=1e-38)
    if not bool(torch.isfinite(am)):
        raise ValueError("weight contains NaN or Inf")
    return am, torch.bucketize(torch.clamp(rest / am, -1, 1), t.bounds, out_int32=True)


def block_absmax(w: torch.Tensor, spec: Quant4Spec) -> torch.Tensor:
    """Per-block absmax of `w` as bnb computes it (a first pass when double quant needs the whole vector)."""
    _check_dtype(w)
    flat = w.reshape(-1)
    n, bs = flat.numel(), spec.blocksize
    full, chunk, n_chunks = _chunks(n, bs)
    absmax = torch.empty(-(n // -bs), dtype=torch.float32)

    def stripe(c0: int, c1: int) -> None:
        ws = _Workspace(chunk, bs)
        for c in range(c0, c1):
            lo, hi = c * chunk, min(full, (c + 1) * chunk)
            _absmax_chunk(flat[lo:hi], spec, ws, absmax[lo // bs:hi // bs])

    _parallel(n_chunks, stripe)
    if full < n:
        absmax[-1] = _partial_block(flat[full:], spec)[0]
    return absmax


def _codes(w: torch.Tensor, spec: Quant4Spec, out: torch.Tensor | None, want_q: bool, own_scale: bool,
           scale: torch.Tensor | None):
    """One pass over `w`: per-block absmax, per element its code value (times the block's scale if
    own_scale, i.e. its own absmax, or `scale` when given) and, if asked, its sorted code index."""
    flat = w.reshape(-1)
    n, bs = flat.numel(), spec.blocksize
    full, chunk, n_chunks = _chunks(n, bs)
    absmax = torch.empty(-(n // -bs), dtype=torch.float32)
    vals = out.reshape(-1) if out is not None else torch.empty(n, dtype=torch.float32)
    q_all = torch.empty(n, dtype=torch.int32) if want_q else None
    values = _values(spec, w.shape, sorted_order=True)

    def stripe(c0: int, c1: int) -> None:
        ws = _Workspace(chunk, bs)
        for c in range(c0, c1):
            lo, hi = c * chunk, min(full, (c + 1) * chunk)
            am = absmax[lo // bs:hi // bs]
            sc = am if own_scale else (scale[lo // bs:hi // bs] if scale is not None else None)
            _chunk(flat[lo:hi], spec, ws, am, vals[lo:hi], q_all[lo:hi] if q_all is not None else None, sc, values)

    _parallel(n_chunks, stripe)
    if full < n:
        am, qr = _partial_block(flat[full:], spec)
        absmax[-1] = am
        sc = am if own_scale else (scale[-1] if scale is not None else None)
        vals[full:] = values[qr] * sc if sc is not None else values[qr]
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
    shape: torch.Size
    spec: Quant4Spec


def effective_absmax(absmax: torch.Tensor, spec: Quant4Spec) -> torch.Tensor:
    """The per-block scale the dequantizer multiplies by (the absmax itself, or its 8-bit round trip)."""
    return double_quantize(absmax, spec.threads)[0] if spec.double_quant else absmax


def round_trip(w: torch.Tensor, spec: Quant4Spec, out: torch.Tensor | None = None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(w)) in float32, bit-identical to bitsandbytes' CPU kernels (as the model used it).

    With double quant the scale of each block depends on the whole tensor's absmax vector: a caller that
    feeds a tensor in row chunks passes `scale` (its slice of effective_absmax(block_absmax(whole)))."""
    _check_dtype(w)
    n_blocks = -(w.numel() // -spec.blocksize)
    if not spec.double_quant:
        return _codes(w, spec, out, want_q=False, own_scale=True, scale=None)[0].view(w.shape)
    if scale is not None:
        if scale.numel() != n_blocks:
            raise ValueError(f"scale has {scale.numel()} entries for {n_blocks} blocks")
        return _codes(w, spec, out, want_q=False, own_scale=False, scale=scale)[0].view(w.shape)
    vals, absmax, _ = _codes(w, spec, out, want_q=False, own_scale=False, scale=None)
    scale = effective_absmax(absmax, spec)  # known only once every block's absmax is
    n, bs = vals.numel(), spec.blocksize
    full, step, n_steps = _chunks(n, bs)

    def stripe(c0: int, c1: int) -> None:
        for c in range(c0, c1):
            lo, hi = c * step, min(full, (c + 1) * step)
            vals[lo:hi].view(-1, bs).mul_(scale[lo // bs:hi // bs, None])

    _parallel(n_steps, stripe)
    if full < n:
        vals[full:] *= scale[-1]
    return vals.view(w.shape)


def quantize(w: torch.Tensor, spec: Quant4Spec) -> Quantized:
    """Quantize `w` into bitsandbytes' packed layout (for verification against bnb, and for tests)."""
    _check_dtype(w)
    t = tables(spec.quant_type)
    _, absmax, q = _codes(w, spec, None, want_q=True, own_scale=False, scale=None)
    codes = t.order.to(torch.uint8)[q.long()]
    if codes.numel() % 2:
        # bnb pads the scaled values with a 0 before packing: the pad gets the code of 0.
        pad = t.order[torch.bucketize(torch.zeros(1), t.bounds)].to(torch.uint8)
        codes = torch.cat([codes, pad])
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    if not spec.double_quant:
        return Quantized(packed, absmax, None, None, w.shape, spec)
    _, qabsmax, offset, absmax2 = double_quantize(absmax, spec.threads)
    return Quantized(packed, qabsmax, offset, absmax2, w.shape, spec)


def dequantize(qw: Quantized) -> torch.Tensor:
    """float32 weights from a `Quantized` (same arithmetic as bnb's CPU dequantize: code * scale)."""
    spec = qw.spec
    hi, lo = qw.packed.view(-1) >> 4, qw.packed.view(-1) & 0xF
    idx = torch.stack([hi, lo], dim=1).view(-1)[: qw.shape.numel()].long()
    vals = _values(spec, qw.shape, sorted_order=False)[idx]
    if spec.double_quant:
        scale = dequantize_nested(qw.absmax, qw.nested_absmax, qw.offset)
    else:
        scale = qw.absmax
    n, bs = vals.numel(), spec.blocksize
    full = _full_blocks(n, bs)
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (vals[:full].view(-1, bs) * scale[: full // bs, None]).view(-1)
    if full < n:
        out[full:] = vals[full:] * scale[-1]
    return out.view(qw.shape)
