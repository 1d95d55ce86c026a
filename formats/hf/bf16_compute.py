"""bf16 models on a CPU without native bf16: each linear layer's product accumulated in float32, the way a GPU's
tensor cores compute a bf16 GEMM, at float32's speed.

    lorax check adapter/ dist/model-q4_k_m.gguf     # the reference and hf:merged, when they compute in bf16

torch's CPU bf16 linear on AVX2 (no AVX512-BF16/AMX) widens the inputs, accumulates in float32 and rounds the
output to bf16, at a fifth of float32's GEMM throughput (2-core EPYC: 20.6 vs 98.6 GFLOPS at 512 x 2048 x 8192).
Widening both operands first (exact: bf16 -> float32 loses nothing), multiplying in float32 and rounding the
product to bf16 is the same arithmetic up to the order of the float32 sums: every output within one bf16
rounding plus float32 summation error of the exact product, as torch's own kernel's are (tests/test_bf16_compute),
and as any two bf16 GEMM kernels (or a GPU and a CPU) differ. Which order depends on the row count (see
MIN_TRANSPOSED_ROWS). Through a whole model's bf16 activations two such orders move logits by a few bf16 ulps
(tiny test model: per-position KLD under 1e-3; 1.18B bench: up to 0.11 in a logit). Everything else (norms,
attention, activations) stays in bf16.

Scoped: `accumulate_in_float32(model)` makes that model's own forward calls run under a TorchFunctionMode
that takes F.linear; nothing outside those calls changes. It cannot reach inside a custom op: bitsandbytes'
CPU 4-bit matmul (the `gemm_4bit` op) keeps torch's kernel under it, so the reference proves its
dequantized-once layers against bitsandbytes on torch's kernels first and switches after
(exporter.gate.fast_reference.prepare).
"""

from __future__ import annotations

import functools
import weakref

from lorax_common.memory import ReusedBuffer


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where torch's bf16 GEMM is the fast one."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def _mode_class():
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class Float32Accumulate(TorchFunctionMode):
        """F.linear of bf16 CPU tensors as float32 products rounded to bf16; every other call as is."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                x, w, *rest = args
                b = rest[0] if rest else kwargs.get("bias")
                if x.dtype == w.dtype == torch.bfloat16 and x.device.type == w.device.type == "cpu":
                    return widened_linear(x, w, b)
            return func(*args, **kwargs)

    return Float32Accumulate


# Output rows widened at a time: ~4 MiB of float32 weight, which stays in cache for its GEMM. Widening a whole
# 5632 x 2048 weight per call streams 46 MB through memory: 2.8x slower for a 10-row decode step, 1.3x for 512
# rows (2-core EPYC, AVX2).
CHUNK_ELEMENTS = 2**20

# Which way round the GEMM runs, by input rows. torch's CPU float32 GEMM (MKL here) is fast for few rows only as
# weight-rows x input-rows (W @ x.T) with the input rows a multiple of 16: a decode step of the 1.18B bench
# model, 11 or 16 rows, 1.1-1.3 s as x @ W.T, 0.5-0.6 s so (AMD EPYC, AVX2, 2 cores). Under MIN_TRANSPOSED_ROWS rows
# x @ W.T wins (1 row: 0.28 vs 0.55 s); from ~500 rows on the two are within a few percent.
PAD_ROWS = 16
MIN_TRANSPOSED_ROWS = 4


def widened_linear(x, w, b=None):
    """linear(x, w, b) for bf16 x, w: float32 products of the widened operands, rounded to bf16. Each output is
    one float32 dot product over the input features; which kernel sums it (and so the order of its float32
    sums) depends on the row count, as for any GEMM."""
    import torch

    x32 = x.reshape(-1, x.shape[-1]).float()
    rows_in = x32.shape[0]
    transposed = rows_in >= MIN_TRANSPOSED_ROWS
    if transposed and rows_in % PAD_ROWS:  # zero rows: their outputs are computed and dropped
        x32 = torch.cat([x32, x32.new_zeros(PAD_ROWS - rows_in % PAD_ROWS, x32.shape[1])])
    out = torch.empty((w.shape[0], x32.shape[0]) if transposed else (x32.shape[0], w.shape[0]), dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
    scratch = _WIDENED.take(step * w.shape[1])  # overwritten chunk by chunk (forward only: out= has no grad)
    for i in range(0, w.shape[0], step):
        rows = min(step, w.shape[0] - i)
        # contiguous whatever w's strides: a strided operand takes another GEMM path (other sums)
        chunk = scratch[: rows * w.shape[1]].view(rows, w.shape[1]).copy_(w[i:i + rows])
        if transposed:
            torch.matmul(chunk, x32.T, out=out[i:i + rows])
        else:
            torch.matmul(x32, chunk.T, out=out[:, i:i + rows])
    if transposed:
        out = out.T[:rows_in]
    if b is not None:
        out = out + b.float()
    return out.to(torch.bfloat16).reshape(*x.shape[:-1], w.shape[0])


# Each thread's buffer for widened weight rows. Allocated per chunk, each 4 MiB block was fresh pages from the
# kernel wherever glibc's mmap threshold is fixed below it (lorax_common.memory): with it at 1 MiB, the 1.18B
# bench reference's 10 rows x 8 decode steps took 32.4 s, 18.5 s with one reused buffer.
_WIDENED = ReusedBuffer()


def float32_accumulate():
    """The context manager itself (a fresh mode each time: modes are not reentrant)."""
    return _mode_class()()


def wanted(model) -> bool:
    """Whether `model` computes in bf16 on a CPU that lacks native bf16."""
    import torch

    if native_bf16():
        return False
    return any(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())


def accumulate_in_float32(model) -> bool:
    """Make `model`'s forward calls accumulate its bf16 linear products in float32 (this instance only); returns
    whether it did (see wanted)."""
    if not wanted(model) or "forward" in vars(model):  # already wrapped here, or by someone else
        return False
    model.forward = _scoped_forward(model)
    return True


def accumulating(model) -> bool:
    """Whether accumulate_in_float32 switched `model` (derived from the model itself, not remembered)."""
    return getattr(vars(model).get("forward"), "float32_accumulate", False)


def _scoped_forward(model):
    """model's class forward under the mode. It holds model weakly: a forward stored on the module that refers
    back to it would put the whole model in a reference cycle (resident until a full collection)."""
    ref = weakref.ref(model)
    forward = type(model).forward

    def scoped(*args, **kwargs):
        with float32_accumulate():
            return forward(ref(), *args, **kwargs)

    scoped.float32_accumulate = True
    return scoped
