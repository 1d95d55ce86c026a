"""bf16 models on a CPU without native bf16: linear products accumulated in float32 (formats.hf.bf16_compute),
for hf targets and for the reference after its probe against bitsandbytes' own path.

    lorax check adapter/ dist/model-q4_k_m.gguf     # report.md: "Reference arithmetic: bf16 linear products ..."

Every test pretends the CPU lacks native bf16 (on one that has it, nothing is switched), so they run the same
everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import formats.hf.bf16_compute as bc

PROMPTS = [[1 + (i * 11 + j * 3) % 400 for j in range(9 + 5 * i)] for i in range(3)]


@pytest.fixture()
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(bc, "native_bf16", lambda: False)


def _by_module(model):
    """An independent route to the same arithmetic: every nn.Linear's own forward widened, multiplied and
    rounded (no function mode)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = (lambda m: lambda x: F.linear(x.float(), m.weight.float(),
                                                        None if m.bias is None else m.bias.float()).bfloat16())(mod)
    return model


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x.astype(np.float64)), 2.0**-126))) - 7)


def test_hf_bf16_runner_accumulates_in_float32_exactly_as_widened_products(tiny_model_dir, no_native_bf16):
    from formats.hf.load import load_causal_lm
    from formats.hf.runner import HFRunner

    runner = HFRunner(tiny_model_dir, dtype="bfloat16")
    assert runner.float32_accumulate
    want = HFRunner(tiny_model_dir, model=_by_module(load_causal_lm(tiny_model_dir, "bfloat16")),
                    float32_accumulate=False)
    native = HFRunner(tiny_model_dir, dtype="bfloat16", float32_accumulate=False)
    for p in PROMPTS:
        got = runner.logits(p)
        assert np.array_equal(got, want.logits(p))  # bit for bit the hand-widened model
        # and torch's own bf16 kernel is the same arithmetic up to the order of float32 sums
        assert np.all(np.abs(got - native.logits(p)) <= 4 * bf16_ulp(got)), p
    assert runner.generate_batch(PROMPTS, 6) == want.generate_batch(PROMPTS, 6)
    # the gate's teacher-forced cells (formats.hf.session) run through model(...) too
    got_s, want_s = runner.cache_session(len(PROMPTS)), want.cache_session(len(PROMPTS))
    for a, b in zip(got_s.feed(PROMPTS), want_s.feed(PROMPTS), strict=True):
        assert np.array_equal(a, b)
    # nothing outside the model's own calls runs under the mode, also after a forward that raised
    assert torch._C._len_torch_function_stack() == 0
    with pytest.raises(IndexError):
        runner.logits([10**6])  # an id past the vocabulary
    assert torch._C._len_torch_function_stack() == 0


def test_float32_models_and_native_bf16_cpus_are_left_alone(tiny_model_dir, monkeypatch):
    from formats.hf.runner import HFRunner

    monkeypatch.setattr(bc, "native_bf16", lambda: False)
    assert not HFRunner(tiny_model_dir).float32_accumulate  # float32 weights: nothing to widen
    monkeypatch.setattr(bc, "native_bf16", lambda: True)
    runner = HFRunner(tiny_model_dir, dtype="bfloat16")
    assert not runner.float32_accumulate and "forward" not in vars(runner.model)


def test_the_wrapped_model_is_freed_without_a_collection(tiny_model_dir, no_native_bf16):
    import gc
    import weakref

    from formats.hf.load import load_causal_lm

    model = load_causal_lm(tiny_model_dir, "bfloat16")
    assert bc.accumulate_in_float32(model)
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None  # the stored forward holds the model weakly: no reference cycle
    finally:
        gc.enable()


def test_reference_probe_runs_on_torch_kernels_then_accumulates_in_float32(tiny_model_dir, tmp_path, no_native_bf16):
    """A bf16-compute QLoRA reference (training on a bf16 GPU): the dequantized-once layers are proven bit for bit
    against bitsandbytes' own matmul first (a function mode cannot reach inside bitsandbytes' op, so the proof
    runs on torch's kernels on both sides), then the reference switches, and says by how much it moved."""
    from adapters import LoraSpec, make_adapter

    from exporter.gate.fast_reference import prepare
    from exporter.gate.reference import read_adapter, reference_runner
    from exporter.gate.samples import build, load_rows

    ad = tmp_path / "adapter"
    make_adapter(tiny_model_dir, ad, trained_on="nf4", spec=LoraSpec(load_dtype="bfloat16", compute_dtype="bfloat16"))
    ref = reference_runner(read_adapter(ad))
    samples = build(load_rows(None, ad)[0], ref.tokenizer)
    assert not ref.float32_accumulate
    native = [ref.logits(s.ids) for s in samples]
    path = prepare(ref, samples[0].ids)
    assert path["path"] == "dequantized once" and path["max_abs_logit_delta"] == 0.0, path
    assert ref.float32_accumulate and "float32" in path["bf16_products"]
    got = [ref.logits(s.ids) for s in samples]
    assert path["bf16_max_abs_logit_vs_torch_kernel"] == float(np.abs(got[0].astype(np.float64) - native[0]).max())
    for g, n in zip(got, native, strict=True):
        assert np.all(np.abs(g - n) <= 4 * bf16_ulp(g))


@pytest.mark.parametrize("rows", [1, 10, 64])
def test_widened_linear_in_chunks_is_the_whole_widened_product(monkeypatch, rows):
    """Chunks of output rows (the weight widened a few MiB at a time) give the whole widened product bit for
    bit, for a plain weight and for the transposed view bitsandbytes hands linear; 3-d inputs keep their shape."""
    monkeypatch.setattr(bc, "CHUNK_ELEMENTS", 64 * 300)  # 64-row chunks of a 1000 x 300 weight, the last partial
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 300, generator=g).bfloat16()
    w = (torch.randn(1000, 300, generator=g) * 0.05).bfloat16()
    whole = F.linear(x.float(), w.float()).bfloat16()
    assert torch.equal(bc.widened_linear(x, w), whole)
    assert torch.equal(bc.widened_linear(x, w.T.contiguous().T), whole)
    with torch.inference_mode():  # the gate's forwards: the same reused scratch buffer, the same bits
        assert torch.equal(bc.widened_linear(x, w), whole)
    b = torch.randn(1000, generator=g).bfloat16()
    got, want = bc.widened_linear(x, w, b).float(), F.linear(x.float(), w.float(), b.float()).bfloat16().float()
    assert torch.all((got - want).abs() <= torch.from_numpy(bf16_ulp(want.numpy())))  # bias added last: one rounding
