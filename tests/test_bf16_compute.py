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


def _product(x, w, b):
    """The arithmetic bf16_compute documents, written out: float32 products of the widened operands summed by
    torch's float32 GEMM, weight rows x input rows (W @ x.T) with the input rows zero-padded to a multiple of 16,
    or x @ W.T under 4 input rows; the bias added in float32; one rounding to bf16. (The tiny model's weights fit
    one chunk, so chunking does not enter.)"""
    x32 = x.reshape(-1, x.shape[-1]).float()
    n = x32.shape[0]
    if n < 4:
        y = x32 @ w.float().T
    else:
        y = (w.float() @ F.pad(x32, (0, 0, 0, -n % 16)).T).T[:n]
    if b is not None:
        y = y + b.float()
    return y.bfloat16().reshape(*x.shape[:-1], w.shape[0])


def _by_module(model):
    """An independent route to the same arithmetic: every nn.Linear's own forward widened, multiplied and
    rounded (no function mode)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = (lambda m: lambda x: _product(x, m.weight, m.bias))(mod)
    return model


def per_position_kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def log_softmax(a):
        a = a.astype(np.float64) - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def argmax_flips_only_on_ties(a: np.ndarray, b: np.ndarray) -> bool:
    """Where a and b pick different tokens, each one's pick is within twice their largest logit difference of
    the other's top logit in both: a near tie either order of sums may break either way."""
    gap = 2 * float(np.abs(a.astype(np.float64) - b).max())
    ia, ib = a.argmax(-1), b.argmax(-1)
    rows = np.nonzero(ia != ib)[0]
    return all(x[r, i] >= x[r].max() - gap for r in rows for x in (a, b) for i in (ia[r], ib[r]))


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
        # torch's own bf16 kernel sums in another order (each product within test_widened_linear_in_chunks'
        # bound of both); through the model's bf16 activations that is a 2.7e-4 mean, 5.3e-4 worst per-position
        # KLD on these prompts (measured), with the same argmax everywhere
        nat = native.logits(p)
        assert argmax_flips_only_on_ties(got, nat), p
        assert per_position_kld(nat, got).max() < 1e-3, p
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

    from exporter.gate.fast_reference import PROBE_TOKENS, prepare
    from exporter.gate.reference import read_adapter, reference_runner
    from exporter.gate.samples import build, load_rows

    ad = tmp_path / "adapter"
    make_adapter(tiny_model_dir, ad, trained_on="nf4", spec=LoraSpec(load_dtype="bfloat16", compute_dtype="bfloat16"))
    ref = reference_runner(read_adapter(ad))
    samples = build(load_rows(None, ad)[0], ref.tokenizer)
    assert not ref.float32_accumulate
    probe = samples[0].ids[:PROBE_TOKENS]
    native = [ref.logits(s.ids) for s in samples]
    native_probe = ref.logits(probe)
    path = prepare(ref, samples[0].ids)
    assert path["path"] == "dequantized once" and path["max_abs_logit_delta"] == 0.0, path
    assert ref.float32_accumulate and "float32" in path["bf16_products"]
    got = [ref.logits(s.ids) for s in samples]
    moved = float(np.abs(ref.logits(probe).astype(np.float64) - native_probe).max())
    assert path["bf16_max_abs_logit_vs_torch_kernel"] == moved > 0.0
    for g, n in zip(got, native, strict=True):  # the other order of float32 sums, as in the runner test above
        assert argmax_flips_only_on_ties(g, n)
        assert per_position_kld(n, g).max() < 1e-3


def float32_sum_bound(x, w, b=None):
    """(the exact product in float64, how far a float32 GEMM rounded once to bf16 may be from it): one bf16 rounding
    of the exact value plus float32 summation error over K products (|error| <= K * 2**-24 * sum |x_i w_i|)."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double()
    exact = x64 @ w64.T + (0 if b is None else b.double())
    mag = x64.abs() @ w64.abs().T + (0 if b is None else b.double().abs())
    bound = torch.from_numpy(bf16_ulp(exact.numpy())) + (x.shape[-1] + 1) * 2.0**-24 * mag
    return exact, bound


@pytest.mark.parametrize("rows", [1, 3, 10, 64])
def test_widened_linear_in_chunks_accumulates_in_float32(monkeypatch, rows):
    """Chunks of output rows (the weight widened a few MiB at a time), either GEMM orientation (3-d inputs of
    2 x rows: 2, 6, 20 and 128 input rows, the last two zero-padded to 16s): every output within one bf16 rounding
    plus float32 summation error of the exact product, for a plain weight and for the transposed view bitsandbytes
    hands linear, inside inference mode too, with a bias. The same bound fails for sums kept in bf16."""
    monkeypatch.setattr(bc, "CHUNK_ELEMENTS", 64 * 300)  # 64-row chunks of a 1000 x 300 weight, the last partial
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 300, generator=g).bfloat16()
    w = (torch.randn(1000, 300, generator=g) * 0.05).bfloat16()
    b = torch.randn(1000, generator=g).bfloat16()
    got = bc.widened_linear(x, w)
    assert got.shape == (2, rows, 1000) and got.dtype == torch.bfloat16
    exact, bound = float32_sum_bound(x, w)
    assert torch.all((got.reshape(-1, 1000).double() - exact).abs() <= bound)
    assert torch.equal(bc.widened_linear(x, w.T.contiguous().T), got)  # strides do not change the sums
    with torch.inference_mode():  # the gate's forwards: the same reused scratch buffer, the same bits
        assert torch.equal(bc.widened_linear(x, w), got)
    native = F.linear(x, w).reshape(-1, 1000).double()  # torch's own bf16 kernel: the same bound holds
    assert torch.all((native - exact).abs() <= bound)
    exact_b, bound_b = float32_sum_bound(x, w, b)
    assert torch.all((bc.widened_linear(x, w, b).reshape(-1, 1000).double() - exact_b).abs() <= bound_b + bound)
    # what the bound rules out: the products summed in bf16
    bf16_sums = torch.zeros(2 * rows, 1000, dtype=torch.bfloat16)
    for k in range(300):
        bf16_sums += (x.reshape(-1, 300)[:, k:k + 1].float() * w[:, k].float()).bfloat16()
    assert not torch.all((bf16_sums.double() - exact).abs() <= bound)


def test_few_rows_take_x_wt_and_more_rows_the_padded_w_xt(monkeypatch):
    """The orientation switch itself: under MIN_TRANSPOSED_ROWS input rows the GEMM is x @ W.T; from there on
    W @ x.T over rows padded to PAD_ROWS (their extra outputs dropped)."""
    seen = []
    real = torch.matmul

    def spy(a, b_, out=None):
        seen.append((tuple(a.shape), tuple(b_.shape)))
        return real(a, b_, out=out)

    monkeypatch.setattr(torch, "matmul", spy)
    w = torch.randn(40, 8).bfloat16()
    bc.widened_linear(torch.randn(3, 8).bfloat16(), w)
    bc.widened_linear(torch.randn(5, 8).bfloat16(), w)
    assert seen == [((3, 8), (8, 40)), ((40, 8), (8, 16))]
