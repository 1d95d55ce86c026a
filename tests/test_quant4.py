"""exporter.merge.quant4 against bitsandbytes itself: packed codes, absmax, double-quant stats and the
dequantized weights must be identical bit for bit (sign of zero included), for every quant type,
input dtype and shape class (even/odd last dim, partial last block)."""

from __future__ import annotations

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from exporter.merge.quant4 import (  # noqa: E402
    Quant4Spec,
    block_absmax,
    dequantize,
    effective_absmax,
    quantize,
    round_trip,
)

SHAPES = [(64, 128), (5, 77), (3, 64 * 40 + 3), (96, 1000)]  # plain, odd last dim, partial block, rem % 128


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def bnb_reference(w: torch.Tensor, spec: Quant4Spec):
    """bnb's packed weight + state, and the weight its CPU matmul actually multiplies by (float32)."""
    packed, state = bnbf.quantize_4bit(w.to(spec.input_dtype), blocksize=spec.blocksize,
                                       compress_statistics=spec.double_quant, quant_type=spec.quant_type)
    scale = state.absmax
    if state.nested:  # as bitsandbytes' gemm_4bit does before dequantizing
        scale = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset
    deq = torch.ops.bitsandbytes.dequantize_4bit.default(packed, scale, spec.blocksize, spec.quant_type,
                                                          state.shape, torch.float32)
    return packed, state, deq


def weight(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.1
    w.view(-1)[:64] = 0  # an all-zero block: bnb gives +0.0 there
    w.view(-1)[70:80] = 0
    return w.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_identical_to_bitsandbytes(quant_type, double_quant, dtype):
    for shape in SHAPES:
        for blocksize in (64, 128) if dtype == torch.float32 else (64,):
            spec = Quant4Spec(quant_type, blocksize, double_quant, dtype)
            w = weight(shape, dtype)
            packed, state, deq = bnb_reference(w, spec)
            mine = quantize(w, spec)
            assert torch.equal(mine.packed, packed), (shape, blocksize)
            assert torch.equal(mine.absmax.view(torch.uint8), state.absmax.view(torch.uint8)), (shape, blocksize)
            if double_quant:
                assert torch.equal(bits(mine.offset.reshape(1)), bits(state.offset.reshape(1)))
                assert torch.equal(bits(mine.nested_absmax), bits(state.state2.absmax))
            assert torch.equal(bits(round_trip(w, spec)), bits(deq)), (shape, blocksize)
            assert torch.equal(bits(dequantize(mine)), bits(deq)), (shape, blocksize)


def test_input_dtype_matters_and_is_detected():
    """The comparison can fail: quantizing the float32 weight when training cast it to bfloat16 first
    (or with another blocksize) gives different weights, and the bit check sees it."""
    w = weight((64, 256), torch.float32, seed=1)
    _, _, deq = bnb_reference(w, Quant4Spec("nf4", 64, False, torch.bfloat16))
    assert not torch.equal(bits(round_trip(w, Quant4Spec("nf4", 64, False, torch.float32))), bits(deq))
    assert not torch.equal(bits(round_trip(w, Quant4Spec("nf4", 128, False, torch.bfloat16))), bits(deq))
    assert torch.equal(bits(round_trip(w, Quant4Spec("nf4", 64, False, torch.bfloat16))), bits(deq))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_row_chunks_with_precomputed_scale_equal_whole_tensor(quant_type):
    """How the merge streams a double-quantized weight: absmax pass first, then row chunks."""
    spec = Quant4Spec(quant_type, 64, True, torch.bfloat16)
    w = weight((300, 640), torch.float32, seed=2)
    scale = effective_absmax(block_absmax(w, spec), spec)
    per_row = 640 // 64
    parts = [round_trip(w[r:r + 100], spec, scale=scale[r * per_row:(r + 100) * per_row]) for r in range(0, 300, 100)]
    assert torch.equal(bits(torch.cat(parts)), bits(bnb_reference(w, spec)[2]))
    with pytest.raises(ValueError, match="blocks"):
        round_trip(w[:100], spec, scale=scale)


def test_values_near_every_code_boundary():
    """Elements a few ulps either side of each code midpoint land where bnb's bucketize puts them."""
    for quant_type in ("nf4", "fp4"):
        code = bnbf.get_4bit_type(quant_type, device="cpu")
        srt = code.sort().values
        mids = (srt[:-1] + srt[1:]) / 2
        near = torch.cat([torch.nextafter(mids, torch.full_like(mids, s)) for s in (-1.0, 1.0)] + [mids])
        for _ in range(3):
            near = torch.cat([near, torch.nextafter(near, torch.ones_like(near)),
                              torch.nextafter(near, -torch.ones_like(near))])
        vals = near.unique()
        blocks = torch.zeros(len(vals), 64)
        blocks[:, 0] = 1.0  # absmax 1: the scaled value is the element itself
        blocks[:, 1] = vals
        w = blocks
        spec = Quant4Spec(quant_type, 64, False, torch.float32)
        assert torch.equal(bits(round_trip(w, spec)), bits(bnb_reference(w, spec)[2]))


def test_nan_weight_is_refused():
    w = weight((64, 128), torch.float32)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        round_trip(w, Quant4Spec("nf4"))


def test_double_quant_uses_the_torch_kernel_only_when_it_matches_bnb(monkeypatch):
    from exporter.merge import quant4_nested as nested

    nested._quantize_8bit_impl.cache_clear()
    assert nested._quantize_8bit_impl() is nested._quantize_8bit_torch  # it matches the installed bnb
    real = nested._quantize_8bit_torch

    def one_code_off(x):  # a kernel wrong in a single element: the probe must reject it
        q, absmax = real(x)
        q = q.clone()
        q[1000] = q[1000] + 1 if q[1000] < 255 else q[1000] - 1
        return q, absmax

    monkeypatch.setattr(nested, "_quantize_8bit_torch", one_code_off)
    nested._quantize_8bit_impl.cache_clear()
    try:
        assert nested._quantize_8bit_impl() is nested._quantize_8bit_bnb
    finally:
        nested._quantize_8bit_impl.cache_clear()


def test_double_quant_mean_follows_the_quantizing_process_thread_count():
    """Beyond ~1M blocks torch's mean() rounds differently per thread count, and bnb's double quant starts
    with absmax.mean(): the spec carries the quantizing process's thread count to reproduce it (lorax.json
    quantization.torch_threads; default: this process's)."""
    absmax = torch.rand(1 << 21, generator=torch.Generator().manual_seed(3)) * 0.2  # a 128M-element weight

    def bnb_scale(threads: int) -> torch.Tensor:  # bnb's compress_statistics branch, with that many threads
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            offset = absmax.mean()
            q, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
            return torch.ops.bitsandbytes.dequantize_blockwise.default(
                q, state2.absmax, state2.code, 256, torch.float32) + offset
        finally:
            torch.set_num_threads(before)

    one, sixteen = bnb_scale(1), bnb_scale(16)
    # The effect is real at this size: a one-ulp shift of the mean shifts most scales by an ulp and moves
    # some blocks' 8-bit scale codes by a whole step.
    assert not torch.equal(bits(one), bits(sixteen))
    for threads, expected in ((1, one), (16, sixteen)):
        mine = effective_absmax(absmax, Quant4Spec("nf4", 64, True, torch.float32, threads=threads))
        assert torch.equal(bits(mine), bits(expected)), threads
