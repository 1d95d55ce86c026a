"""The gate's batched evaluation: every runner's batch methods return what its one-row methods do, batches are
planned within the memory budget, and the 4-bit reference's dequantize-once path is bit-identical or refused."""

from __future__ import annotations

import numpy as np
import pytest

from formats.runner import plan_batches

ROW_LENGTHS = (5, 17, 9, 30, 2, 40, 11)


def rows(vocab: int = 500) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(3, vocab, size=n))) for n in ROW_LENGTHS]


def test_plan_batches_covers_every_row_once_within_budget():
    lengths = [40, 3, 17, 17, 90, 5, 64, 8, 8, 1]
    vocab, budget = 1000, 200_000
    batches = plan_batches(lengths, vocab, budget, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        # a batch of more than one row fits the budget with every row padded to the widest
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) * vocab * 4 <= budget
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths)  # similar lengths together: little padding


def test_plan_batches_gives_an_oversized_row_its_own_batch():
    assert plan_batches([10, 5000, 12], vocab=1000, budget_bytes=1000) == [[0], [2], [1]]


def _stop_after(runner, prompts, k: int) -> None:
    """Make the k-th greedy token of the first prompt a stop token, so rows end at different steps."""
    runner.stop = set(runner.stop) | {runner.generate(prompts[0], k + 1)[k]}


def assert_batch_equals_single(runner, prompts, atol: float) -> float:
    single = [runner.logits(r) for r in prompts]
    batch = runner.logits_batch(prompts)
    worst = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(single, batch, strict=True))
    assert [b.shape for b in batch] == [a.shape for a in single]
    assert worst <= atol, worst
    _stop_after(runner, prompts, 3)
    assert runner.generate_batch(prompts, 20) == [runner.generate(r, 20) for r in prompts]
    return worst


def test_hf_runner_batches_match_one_row_at_a_time(tiny_model_dir):
    from formats.hf.runner import HFRunner

    worst = assert_batch_equals_single(HFRunner(tiny_model_dir), rows(), atol=1e-4)
    assert worst < 1e-4  # measured 5.7e-6: GEMM blocking of a wider batch, nothing else


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_gguf_runner_batches_match_one_row_at_a_time(tiny_model_dir, tmp_path, qtype):
    from formats.gguf.export import export_gguf
    from formats.gguf.runner import GGUFRunner

    (f,) = export_gguf(tiny_model_dir, tmp_path, [qtype])
    with GGUFRunner(f.path, n_threads=1) as g:
        assert_batch_equals_single(g, rows(), atol=0.0)  # one prefill per row: the same computation


def test_gguf_batch_generation_applies_the_lora(tiny_model_dir, tmp_path):
    """The batch context is a second llama.cpp context: the LoRA must be set on it too."""
    from gguf_helpers import build_lora

    from formats.gguf.adapter import write_lora_gguf
    from formats.gguf.export import export_gguf
    from formats.gguf.runner import GGUFRunner

    build_lora(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", seed=1)
    (base,) = export_gguf(tiny_model_dir, tmp_path / "base", ["f32"])
    lora = tmp_path / "lora.gguf"
    write_lora_gguf(tmp_path / "adapter", tiny_model_dir, lora)
    prompts = rows()
    with GGUFRunner(base.path, n_threads=1) as plain:
        without = plain.generate_batch(prompts, 12)
    with GGUFRunner(base.path, lora_path=lora, n_threads=1) as g:
        with_lora = g.generate_batch(prompts, 12)
        assert with_lora == [g.generate(r, 12) for r in prompts]
    assert with_lora != without


def test_gguf_target_holds_a_context_for_the_gate_s_samples_alone(tiny_model_dir, tmp_path):
    """The gate opens a GGUF with a context for its longest sample (whole sample, or prompt + greedy budget,
    whichever is longer), not llama-cpp-python's 4096 cells of KV cache: the outputs are those of a runner
    with the default context, bit for bit, including a sample that crosses a 256-cell boundary only while
    generating."""
    from exporter.gate.evaluate import Yardstick
    from exporter.gate.samples import Sample
    from exporter.gate.targets import Target
    from formats.gguf.export import export_gguf
    from formats.gguf.runner import GGUFRunner

    (f,) = export_gguf(tiny_model_dir, tmp_path, ["q8_0"])
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(3, 500, size=n))) for n in (250, 12, 97)]
    samples = [Sample(text="", ids=p + [7, 8, 9], prompt_ids=p) for p in prompts]
    from transformers import AutoTokenizer

    yard = Yardstick(samples, AutoTokenizer.from_pretrained(tiny_model_dir), gen_tokens=16)
    assert yard.longest() == 250 + 16  # generating, not the teacher-forced 253, sets the length
    with Target("q8_0", "gguf", "q8_0", f.path).open(yard.longest()) as sized, GGUFRunner(f.path) as default:
        assert sized.llm.n_ctx() == 512 and default.llm.n_ctx() == 4096
        a, b = yard.outputs(sized, "sized"), yard.outputs(default, "default")
        # the one-row path (Phi-3, sliding windows) decodes in the runner's own context, up to its edge
        assert sized.generate(prompts[0], 16) == default.generate(prompts[0], 16)
    assert a.generations == b.generations and all(len(g) == 16 or g[-1] in sized.stop for g in a.generations)
    for x, y in zip(a.logits, b.logits, strict=True):
        assert np.array_equal(x, y)


def test_gate_metrics_do_not_depend_on_batching(nf4_adapter, tmp_path, monkeypatch):
    """The whole gate, one row per batch vs the planned batches: same verdicts, metrics within 1e-6."""
    import formats.runner
    from exporter.gate.check import GateOptions, check
    from exporter.merge.api import merge_adapter

    merged = tmp_path / "merged"
    merge_adapter(nf4_adapter, merged)
    batched = check(nf4_adapter, [merged], GateOptions(floor="off"))
    monkeypatch.setattr(formats.runner, "batch_budget", lambda: 0)  # every batch is one row
    single = check(nf4_adapter, [merged], GateOptions(floor="off"))
    (a,), (b,) = batched.targets, single.targets
    assert a.passed == b.passed
    for k in ("kld_mean", "kld_p99", "top1", "ppl_ratio", "greedy_match"):
        assert abs(a.metrics[k] - b.metrics[k]) <= 1e-6, (k, a.metrics[k], b.metrics[k])


def _nf4_reference(adapter):
    from exporter.gate.reference import read_adapter, reference_runner
    from exporter.gate.samples import build, load_rows

    ref = reference_runner(read_adapter(adapter))
    samples = build(load_rows(None, adapter)[0], ref.tokenizer)
    return ref, samples


def test_dequantize_once_is_bit_identical_to_bitsandbytes(nf4_adapter):
    from exporter.gate.fast_reference import dequantize_once

    ref, samples = _nf4_reference(nf4_adapter)
    before = [ref.logits(s.ids) for s in samples]
    gens = [ref.generate(s.prompt_ids, 12) for s in samples]
    path = dequantize_once(ref, samples[0].ids)
    assert path["path"] == "dequantized once" and path["dequantized_once"] > 0
    assert path["max_abs_logit_delta"] == 0.0
    # every sample, not only the probe: the same bits
    for s, b in zip(samples, before, strict=True):
        assert np.array_equal(ref.logits(s.ids), b)
    assert [ref.generate(s.prompt_ids, 12) for s in samples] == gens


def test_decoding_feeds_the_head_contiguous_inputs(tiny_model_dir):
    """logits_to_keep=1 hands the output projection a strided view of the prefill's last position; torch's
    CPU linear then copies a bf16 weight to float32 and rounds otherwise than every other forward (measured:
    a 49152 x 2048 head, +1.5 GB, the 1.18B bench reference's peak RSS). The runner makes the input
    contiguous, and decodes the same tokens."""
    from formats.hf.runner import HFRunner

    runner = HFRunner(tiny_model_dir, dtype="bfloat16")
    prompts = [[1 + (i * 7 + j) % 400 for j in range(12 + i)] for i in range(4)]
    seen: list[bool] = []
    spy = runner.model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    try:
        batched = runner.generate_batch(prompts, 6)
    finally:
        spy.remove()
    assert len(seen) >= 2 and all(seen), seen
    # The same greedy tokens, except at a tie bfloat16 cannot resolve: on an AVX2-only CPU (no native bf16)
    # a 4-row and a 1-row step round differently (measured: prompt 0's 6th token, 3.78125 vs 3.75 = 2 ulps).
    for p, b, s in zip(prompts, batched, [runner.generate(p, 6) for p in prompts], strict=True):
        k = next((i for i, (x, y) in enumerate(zip(b, s, strict=True)) if x != y), None)
        if k is not None:
            lg = runner.logits(p + s[:k])[-1]
            assert abs(lg[b[k]] - lg[s[k]]) <= 2 * bf16_ulp(lg[s[k]]), (p, k, lg[b[k]], lg[s[k]])


def bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 values (8 significant bits) around x."""
    return 2.0 ** (np.floor(np.log2(max(abs(float(x)), 2.0**-126))) - 7)


def test_dequantize_once_holds_for_a_base_loaded_in_bfloat16(tiny_model_dir, tmp_path):
    """Training loaded in bf16, computing in float32 (the 1.18B bench's setup): bitsandbytes' matmul
    dequantizes the codes straight into float32. functional.dequantize_4bit returns the base's bf16, which
    the probe rejected (1.18B: max |dlogit| 0.15) and left the reference on the slow path."""
    from adapters import LoraSpec, make_adapter

    from exporter.gate.fast_reference import dequantize_once

    ad = tmp_path / "adapter"
    make_adapter(tiny_model_dir, ad, trained_on="nf4", double_quant=True, spec=LoraSpec(load_dtype="bfloat16"))
    ref, samples = _nf4_reference(ad)
    before = [ref.logits(s.ids) for s in samples]
    path = dequantize_once(ref, samples[0].ids)
    assert path["path"] == "dequantized once", path
    for s, b in zip(samples, before, strict=True):
        assert np.array_equal(ref.logits(s.ids), b)


def test_dequantized_weights_are_held_by_their_layers_alone(nf4_adapter, monkeypatch):
    """Nothing but the layer keeps a dequantized weight, so dropping the reference frees them at once. A
    class per layer closing over its weight sat in a reference cycle: 3.7 GB of the 1.18B bench reference
    stayed resident until a full collection (the demo: 405 of 558 MB)."""
    import gc
    import weakref

    import exporter.gate.fast_reference as fr

    ref, samples = _nf4_reference(nf4_adapter)
    made: list = []
    real = fr.dequantize_as_matmul

    def tracked(*args):
        w = real(*args)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(fr, "dequantize_as_matmul", tracked)
    gc.disable()
    try:
        assert fr.dequantize_once(ref, samples[0].ids)["path"] == "dequantized once"
        assert made and all(w() is None for w in made), sum(w() is not None for w in made)
    finally:
        gc.enable()


def test_dequantize_once_restores_bitsandbytes_when_the_logits_differ(nf4_adapter, monkeypatch):
    """A dequantization that is off by one ulp-scale nudge is caught by the probe and undone."""
    import exporter.gate.fast_reference as fr

    ref, samples = _nf4_reference(nf4_adapter)
    before = ref.logits(samples[1].ids)
    plain = fr._plain

    def nudged(layer):
        m = plain(layer)
        m.weight.data[0, 0] += 1e-3  # a planted dequantization fault
        return m

    monkeypatch.setattr(fr, "_plain", nudged)
    path = fr.dequantize_once(ref, samples[0].ids)
    assert path["path"] == "bitsandbytes" and path["max_abs_logit_delta"] > 0
    assert np.array_equal(ref.logits(samples[1].ids), before)  # bitsandbytes' layers are back


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_short_probe_catches_one_wrong_weight_anywhere(nf4_adapter, monkeypatch, where):
    """prepare proves on the head of a sample only (PROBE_TOKENS); a fault in a single weight of the first or the
    last swapped layer, far from the diagonal, is still caught with two tokens and bitsandbytes kept."""
    import exporter.gate.fast_reference as fr

    ref, samples = _nf4_reference(nf4_adapter)
    before = ref.logits(samples[1].ids)
    plain, seen = fr._plain, []
    n_layers = len(fr._linear4bit_slots(ref.model))

    def nudged(layer):
        m = plain(layer)
        seen.append(m)
        if len(seen) == (1 if where == "first" else n_layers):
            r, c = m.weight.shape[0] * 2 // 3, m.weight.shape[1] - 1
            m.weight.data[r, c] += 1e-3  # a planted dequantization fault
        return m

    monkeypatch.setattr(fr, "_plain", nudged)
    monkeypatch.setattr(fr, "PROBE_TOKENS", 2)
    path = fr.prepare(ref, samples[0].ids)
    assert path["path"] == "bitsandbytes" and path["max_abs_logit_delta"] > 0
    assert np.array_equal(ref.logits(samples[1].ids), before)


def test_dequantize_once_keeps_bitsandbytes_without_the_memory(nf4_adapter, monkeypatch):
    import exporter.gate.fast_reference as fr

    ref, samples = _nf4_reference(nf4_adapter)
    monkeypatch.setattr(fr, "MEMORY_SHARE", 0.0)
    path = fr.dequantize_once(ref, samples[0].ids)
    assert path["path"] == "bitsandbytes" and "free memory" in path["reason"]
    assert fr._linear4bit_slots(ref.model)  # untouched


def _row_steps(g, prompt: list[int], steps: int) -> list[np.ndarray]:
    """The logits of greedy decoding one row alone in the runner's own context: after the prompt, then after
    each greedy token."""
    g.llm.reset()
    g.llm.eval(prompt)
    out = [np.array(g.llm.scores[g.llm.n_tokens - 1])]
    for _ in range(steps - 1):
        g.llm.eval([int(out[-1].argmax())])
        out.append(np.array(g.llm.scores[g.llm.n_tokens - 1]))
    return out


@pytest.mark.slow
def test_gguf_batch_decoding_steps_equal_one_row_decoding_bit_for_bit(smollm2_dir, tmp_path, monkeypatch):
    """Every step of the batched decode (each row in its own KV stream, each prompt prefilled alone) gives the
    logits decoding that row alone gives, exactly, on SmolLM2's q8_0 (its kernels do not depend on the batch;
    f32's sgemm and the K-quants' repacked kernels round a many-row step differently: formats/gguf/batch.py).
    The old path, every prompt in one llama_decode and one shared cache, moved the logits by up to 1.35 on the
    demo's chat prompts; the tiny models' 64- and 256-wide rows did not show it."""
    from formats.gguf import batch
    from formats.gguf.export import GGUFOptions, export_gguf
    from formats.gguf.runner import GGUFRunner

    steps: list[np.ndarray] = []
    real = batch.greedy_batch

    def spy(step, n, n_rows, stop):
        def recorded(toks):
            steps.append(step(toks).copy())
            return steps[-1]
        return real(recorded, n, n_rows, stop)

    monkeypatch.setattr(batch, "greedy_batch", spy)
    (f,) = export_gguf(smollm2_dir, tmp_path, ["q8_0"], GGUFOptions(check_tokenizer=False, progress=False))
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(100, 40000, size=n))) for n in rng.integers(40, 85, size=16)]
    with GGUFRunner(f.path) as g:
        batch.generate_many(g.llm, prompts, 4, stop=set())
        assert len(steps) == 4
        alone = [_row_steps(g, p, 4) for p in prompts]
    worst = max(float(np.abs(steps[k][i] - alone[i][k]).max()) for i in range(len(prompts)) for k in range(4))
    assert worst == 0.0, worst  # the old path: 14.1 on these random-token prompts
