"""bitsandbytes' double quantization, exactly: the per-block absmax vector of a 4-bit weight, 8-bit quantized.

    from exporter.merge.quant4_nested import double_quantize
    scale, codes, offset, absmax2 = double_quantize(absmax)   # scale: what the 4-bit dequantizer multiplies by

bnb (functional.quantize_4bit, compress_statistics=True): offset = absmax.mean(); the vector absmax - offset
is quantized in blocks of 256 with the signed "dynamic" map by the CPU kernel `quantize_cpu_impl`; the
matmul later uses code[q] * absmax2 + offset. That kernel is re-done here in torch, step for step: inside
the merge's single-threaded workers bnb's call cost ~12 ms per 24K-value vector (an OpenMP region per
call on a busy machine), the torch one ~1 ms. Kernels differ between bnb releases (the 0.4x source does a
binary search per element), so a probe compares the two once per process and uses bnb on a mismatch.
"""

from __future__ import annotations

import functools

import torch

NESTED_BLOCKSIZE = 256  # bnb's double quantization always uses blocks of 256 absmax values
# torch's default thread count, as training had it: read (never set) at import, before any scoped
# lorax_common.scoped.torch_threads() narrows it for a step
_DEFAULT_THREADS = torch.get_num_threads()


@functools.cache
def _dynamic_code() -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.create_dynamic_map(signed=True).float()  # bnb's "dynamic" map: the double-quant code


@functools.cache
def _lut_8bit() -> torch.Tensor:
    """bnb 0.50's CPU lookup table: for 65536 grid points over [-1, 1], the nearest code (ties down)."""
    code = _dynamic_code()
    mids = (code[:-1] + code[1:]) * 0.5
    c = torch.arange(65536, dtype=torch.float32)
    return torch.searchsorted(mids, (c + c) / 65535.0 - 1.0)


def _quantize_8bit_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb 0.50's CPU 8-bit blockwise quantizer (`quantize_cpu_impl`), step for step, in torch.

    Per block of 256: absmax = max|x|; s = x * (1 / absmax); t = (1 + clamp(s, -1, 1)) * 0.5;
    code = lut[trunc(fma(t, 65535, 0.5))]; an all-zero block gets code 0. The fma is exact in float64
    (a 24-bit by 16-bit product), so rounding that once to float32 is what the fused instruction gives.
    """
    n, bs = x.numel(), NESTED_BLOCKSIZE
    blocks = -(n // -bs)
    padded = torch.nn.functional.pad(x.abs(), (0, blocks * bs - n))
    absmax2 = padded.view(blocks, bs).amax(1)
    inv = torch.where(absmax2 > 0, 1.0 / absmax2, 0.0).repeat_interleave(bs)[:n]  # zero blocks: masked below
    t = (torch.clamp(x * inv, -1.0, 1.0) + 1.0) * 0.5
    cell = (t.double() * 65535.0 + 0.5).float().long()
    q = _lut_8bit()[cell]
    zero = (absmax2 == 0).repeat_interleave(bs)[:n]
    return torch.where(zero, torch.zeros_like(q), q).to(torch.uint8), absmax2


def _quantize_8bit_bnb(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_blockwise(x, blocksize=NESTED_BLOCKSIZE)
    return q, state.absmax


@functools.cache
def _quantize_8bit_impl():
    """Use the torch version only if it matches the installed bitsandbytes on a probe, else bnb itself.

    The CPU kernel's algorithm changes between bnb releases (0.4x: binary search per element, one thread
    per block; 0.50: a 65536-entry table); a probe of ~8K values over many magnitudes tells them apart.
    """
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(8192, generator=g) * torch.logspace(-6, 2, 8192)[torch.randperm(8192, generator=g)]
    probe[:256] = 0  # an all-zero block
    ours, theirs = _quantize_8bit_torch(probe), _quantize_8bit_bnb(probe)
    same = torch.equal(ours[0], theirs[0]) and torch.equal(ours[1].view(torch.int32), theirs[1].view(torch.int32))
    return _quantize_8bit_torch if same else _quantize_8bit_bnb


def _quantize_8bit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_8bit_impl()(x)


def double_quantize(absmax: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, ...]:
    """Double quantization of the absmax vector: (dequantized absmax, codes, offset, nested absmax)."""
    from lorax_common.scoped import torch_threads

    with torch_threads(threads or _DEFAULT_THREADS):  # the reduction order bnb's mean() had
        offset = absmax.mean()
    q, absmax2 = _quantize_8bit(absmax - offset)
    return dequantize_nested(q, absmax2, offset), q, offset, absmax2


def dequantize_nested(q: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """As bnb's gemm_4bit: dequantize_blockwise(q, absmax2, code) + offset, all float32."""
    vals = _dynamic_code()[q.long()]
    n = vals.numel()
    return (vals * absmax2.repeat_interleave(NESTED_BLOCKSIZE)[:n]) + offset
