"""The reference at speed: the 4-bit base dequantized once, kept only where it is proven bit-identical.

    lorax check adapter/ dist/model-q4_k_m.gguf      # report.json: "reference_path": {"dequantized_once": 210, ...}

bitsandbytes' CPU Linear4bit (layout pinned by lorax_common.base_as_trained.pin_4bit_layout) computes every
forward as linear(x, dequantize_4bit(W) in the compute dtype, bias): each generated token pays a
dequantization of the whole base. Dequantizing each weight once into a plain layer of the compute dtype is
the same arithmetic on the same values; `dequantize_once` swaps the layers, runs one gate sample both ways
and keeps the swap only when the logits are bit-identical (else it restores bitsandbytes' layers and says
why). The report records which path the reference took and the measured difference, so the invariant (the
reference is the base as training computed with it) is measured on every run, not assumed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

# The dequantized weights may take at most this share of the memory free when the gate starts.
MEMORY_SHARE = 0.5

# The proof runs the head of a gate sample, this many tokens: every swapped layer multiplies each token by its
# whole weight, so any token covers every weight (a planted fault in one weight of the first or last layer is
# caught with 2: tests/test_batched_eval.py), and what the proof pays is forwards on torch's bf16 kernels, ~20
# GFLOPS where the CPU lacks native bf16. 1.18B bench, AVX2: bitsandbytes' forward 3.5 s at 16 tokens, 2.2 s at 4
# (its dequantization of the whole base per forward stays); the dequantized layers' 1.8 s at 16, 0.5 s at 4.
PROBE_TOKENS = 4


def dequantize_as_matmul(packed, qs, compute):
    """The weight exactly as bitsandbytes' 4-bit matmul (the `gemm_4bit` op, the path training and inference
    take on CPU) sees it: the block scales in float32, then the 4-bit codes dequantized straight into the
    compute dtype. Not `functional.dequantize_4bit`, which returns the dtype the base was stored in: a bf16
    base computing in float32 would be rounded to bf16 first (measured on the 1.18B bench base: logits off
    by up to 0.15)."""
    import torch

    ops = torch.ops.bitsandbytes
    absmax = qs.absmax
    if qs.nested:
        absmax = ops.dequantize_blockwise.default(qs.absmax, qs.state2.absmax, qs.state2.code,
                                                  qs.state2.blocksize, torch.float32) + qs.offset
    return ops.dequantize_4bit.default(packed.view(-1, 1), absmax, qs.blocksize, qs.quant_type, qs.shape, compute)


@functools.cache
def _plain_linear():
    """The module class of a dequantized layer: one class at module level, so that nothing but the layer
    holds its weight. (A class defined per layer, closing over its weight, sits in a reference cycle as
    every class does: its float32 weights stayed resident until a full garbage collection, 3.7 GB of the
    1.18B bench reference lingering into the next target.)"""
    import torch

    class PlainLinear(torch.nn.Module):
        def __init__(self, weight, bias, compute) -> None:
            super().__init__()
            self.compute = compute
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            self.in_features, self.out_features = weight.shape[1], weight.shape[0]

        def forward(self, x, *args, **kwargs):
            return torch.nn.functional.linear(x.to(self.compute), self.weight, self.bias).to(x.dtype)

    return PlainLinear


def _plain(layer):
    """A torch module equal to `layer` (a bnb Linear4bit) with its weight dequantized once."""
    import torch

    compute = layer.compute_dtype or torch.float32
    weight = dequantize_as_matmul(layer.weight.data, layer.weight.quant_state, compute)
    bias = None if layer.bias is None else layer.bias.data.to(compute)
    return _plain_linear()(weight, bias, compute)


def _linear4bit_slots(model) -> list[tuple[object, str, object]]:
    """(parent, attribute, layer) of every bitsandbytes Linear4bit in the model."""
    import bitsandbytes as bnb

    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, bnb.nn.Linear4bit)]


def dequantized_bytes(slots) -> int:
    import torch

    return sum(layer.weight.quant_state.shape.numel() * torch.finfo(layer.compute_dtype or torch.float32).bits // 8
               for _, _, layer in slots)


def dequantize_once(runner, ids: Sequence[int]) -> dict:
    """Swap `runner.model`'s 4-bit layers for dequantized ones when memory allows and `ids`' logits come out
    bit-identical; returns what was done, for the report."""
    return _dequantize_once(runner, ids)[0]


def prepare(runner, ids: Sequence[int]) -> dict:
    """The reference made fast and said so: dequantize_once on the first PROBE_TOKENS of `ids`, then (bf16
    compute on a CPU without native bf16) each bf16 linear product accumulated in float32
    (formats.hf.bf16_compute), with the largest logit change that made on the probe against torch's own kernel.
    The probe itself runs on torch's kernels, on both sides: bitsandbytes computes inside its own op, which a
    function mode cannot reach."""
    from formats.hf.bf16_compute import accumulate_in_float32, wanted

    ids = list(ids)[:PROBE_TOKENS]
    path, probe = _dequantize_once(runner, ids)
    if not wanted(runner.model):
        return path
    native = runner.logits(ids) if probe is None else probe
    if not accumulate_in_float32(runner.model):
        return path
    delta = float(np.abs(native.astype(np.float64) - runner.logits(ids).astype(np.float64)).max())
    return {**path, "bf16_products": "accumulated in float32 (this CPU has no native bf16)",
            "bf16_max_abs_logit_vs_torch_kernel": delta}


def _dequantize_once(runner, ids: Sequence[int]) -> tuple[dict, np.ndarray | None]:
    """dequantize_once's record, and the probe's logits on the layers kept (None when no probe ran)."""
    import psutil

    model = getattr(runner, "model", None)
    slots = _linear4bit_slots(model) if model is not None else []
    if not slots:
        return {"path": "as loaded", "dequantized_once": 0}, None
    need, free = dequantized_bytes(slots), psutil.virtual_memory().available
    if need > MEMORY_SHARE * free:
        return {"path": "bitsandbytes", "dequantized_once": 0,
                "reason": f"dequantized weights {need / 2**20:.0f} MiB > {MEMORY_SHARE:.0%} of free memory"}, None
    before = runner.logits(ids)
    for parent, name, layer in slots:
        setattr(parent, name, _plain(layer))
    after = runner.logits(ids)
    delta = float(np.abs(before.astype(np.float64) - after.astype(np.float64)).max())
    if delta != 0.0:  # not the same arithmetic after all: the reference stays bitsandbytes' own
        for parent, name, layer in slots:
            setattr(parent, name, layer)
        return {"path": "bitsandbytes", "dequantized_once": 0, "max_abs_logit_delta": delta,
                "reason": "the dequantized layers' logits differ from bitsandbytes' on the probe sample"}, before
    return {"path": "dequantized once", "dequantized_once": len(slots), "verified_tokens": len(ids),
            "max_abs_logit_delta": delta, "memory_mib": round(need / 2**20)}, after
