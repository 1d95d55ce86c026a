"""The reference's greedy tokens found by checking another model's (exporter.gate.evaluate.verified_generations):
whatever the candidates are (its own tokens, junk, its own with one token changed mid-way), the result equals
the reference decoding on its own; the gate's report says which target it checked and how many rows held."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.gate.evaluate import batched_generations, verified_generations

PROMPTS = [[5, 17, 9, 30], [2, 40, 11, 7, 7, 3], [8], [44, 45, 46, 47, 48, 49, 50, 51]]
BUDGETS = [12, 7, 16, 9]


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    from formats.hf.runner import HFRunner

    return HFRunner(tiny_model_dir)


@pytest.fixture(scope="module")
def own(runner) -> list[list[int]]:
    return batched_generations(runner, PROMPTS, BUDGETS, vocab=512)


def _changed(gens: list[list[int]], at: int) -> list[list[int]]:
    return [g[:at] + [(g[at] + 1) % 500] + g[at + 1:] if len(g) > at else g for g in gens]


CASES = ["own", "junk", "one changed", "cut short", "empty"]


def _candidates(case: str, own: list[list[int]], seed: int) -> list[list[int]]:
    """The runner's own greedy tokens, or junk, or its own with one token changed, cut short, or nothing."""
    if case == "junk":
        rng = np.random.default_rng(seed)
        return [list(map(int, rng.integers(3, 500, size=b))) for b in BUDGETS]
    return {"own": own, "one changed": _changed(own, 3), "cut short": [g[:2] for g in own],
            "empty": [[] for _ in own]}[case]


@pytest.mark.parametrize("case", CASES)
def test_any_candidates_give_the_reference_s_own_greedy_tokens(runner, own, case):
    gens, how = verified_generations(runner, PROMPTS, BUDGETS, _candidates(case, own, seed=0), vocab=512)
    assert gens == own
    assert how["rows"] == len(PROMPTS) and how["verified"] + how["continued"] == len(PROMPTS)
    if case == "own":
        assert how["continued"] == 0  # nothing decoded token by token
    if case in ("junk", "one changed", "cut short", "empty"):
        assert how["continued"] > 0


def test_the_gate_checks_a_target_s_tokens_and_says_so(nf4_adapter, tmp_path, monkeypatch):
    """The whole gate with the proxy vs the reference decoding alone: same verdicts, metrics within 1e-6,
    the same reference generations; report.json names the target whose tokens were checked."""
    from exporter.gate import evaluate
    from exporter.gate.check import GateOptions, check
    from exporter.merge.api import merge_adapter

    monkeypatch.setenv("LORAX_REFERENCE_CACHE", "off")
    merged = tmp_path / "merged"
    merge_adapter(nf4_adapter, merged)
    proxied = check(nf4_adapter, [merged], GateOptions(floor="off"))
    gen = proxied.reference_path["generation"]
    assert gen["checked"] == proxied.targets[0].name and gen["verified"] + gen["continued"] == proxied.samples
    assert gen["verified"] > 0
    monkeypatch.setattr(evaluate, "proxy_target", lambda targets: None)
    alone = check(nf4_adapter, [merged], GateOptions(floor="off"))
    assert "generation" not in alone.reference_path
    (a,), (b,) = proxied.targets, alone.targets
    assert a.passed == b.passed and proxied.reference_task_accuracy == alone.reference_task_accuracy
    for k in ("kld_mean", "kld_p99", "top1", "ppl_ratio", "greedy_match"):
        assert abs(a.metrics[k] - b.metrics[k]) <= 1e-6, (k, a.metrics[k], b.metrics[k])


# --- the same from inside one KV cache per batch (exporter.gate.session_outputs, HF runners) ---

ANSWERS = [[61, 62, 63], [70], [71, 72, 73, 74, 75], [80, 81]]


def _samples():
    from exporter.gate.samples import Sample

    return [Sample(text="", ids=p + a, prompt_ids=p, answer=None) for p, a in zip(PROMPTS, ANSWERS, strict=True)]


def test_session_gives_the_runner_s_own_logits_and_greedy_tokens(runner, own):
    """Teacher-forced logits as a padded batch computes them, bit for bit, and the greedy tokens of decoding
    after a separate prefill, though decoding starts from inside the teacher-forced cache."""
    from exporter.gate.evaluate import batched_logits
    from exporter.gate.session_outputs import session_outputs

    samples = _samples()
    logits, gens, how = session_outputs(runner, samples, BUDGETS, vocab=512)
    assert how is None and gens == own
    for a, b in zip(logits, batched_logits(runner, [s.ids for s in samples], 512), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_session_checks_any_candidates_into_the_runner_s_own_tokens(runner, own, case):
    from exporter.gate.session_outputs import session_outputs

    _, gens, how = session_outputs(runner, _samples(), BUDGETS, 512, _candidates(case, own, seed=1))
    assert gens == own
    assert how["verified"] + how["continued"] == len(PROMPTS)
    assert (how["continued"] == 0) == (case == "own")


def test_session_is_refused_for_sliding_window_attention(tiny_model_factory, tmp_path):
    from formats.gguf.export import export_gguf
    from formats.gguf.runner import GGUFRunner
    from formats.hf.runner import HFRunner

    gemma = tiny_model_factory(arch="gemma3")
    assert HFRunner(gemma).cache_session(2) is None
    (f,) = export_gguf(gemma, tmp_path, ["f32"])
    with GGUFRunner(f.path, n_threads=1) as g:
        assert not g.can_session()  # removing positions from llama.cpp's sliding-window cache is not exact


# --- GGUF files in llama.cpp: formats.gguf.batch.Session (one KV stream per row) ---


@pytest.fixture(scope="module")
def gguf(tiny_model_dir, tmp_path_factory):
    from formats.gguf.export import export_gguf
    from formats.gguf.runner import GGUFRunner

    (f,) = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf"), ["q8_0"])
    with GGUFRunner(f.path, n_threads=1) as g:
        yield g


def test_gguf_session_gives_the_runner_s_own_logits_and_greedy_tokens(gguf):
    """Teacher-forced logits bit for bit as the runner computes them one row at a time, and the greedy tokens
    of batched decoding after a prompt-only prefill, though decoding starts from inside the teacher-forced
    cells (each row rewound to its prompt by removing its later positions)."""
    from exporter.gate.evaluate import batched_generations, batched_logits
    from exporter.gate.session_outputs import session_outputs

    samples = _samples()
    logits, gens, how = session_outputs(gguf, samples, BUDGETS, vocab=512)
    assert how is None and gens == batched_generations(gguf, PROMPTS, BUDGETS, vocab=512)
    assert gens == [gguf.generate(p, b) for p, b in zip(PROMPTS, BUDGETS, strict=True)]
    for a, b in zip(logits, batched_logits(gguf, [s.ids for s in samples], 512), strict=True):
        assert np.array_equal(a, b)


def test_gguf_session_fails_when_a_rewind_keeps_the_answer(gguf, monkeypatch):
    """A planted fault: keep() that leaves the teacher-forced answer in the cache. llama.cpp refuses a token
    whose position does not follow its sequence's last one, so it cannot decode on silently."""
    import llama_cpp

    from exporter.gate.session_outputs import session_outputs
    from formats.errors import FormatError

    monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda *a: True)
    with pytest.raises(FormatError, match="llama_decode failed"):
        session_outputs(gguf, _samples(), BUDGETS, vocab=512)


@pytest.mark.parametrize("case", CASES)
def test_gguf_session_checks_any_candidates_into_the_runner_s_own_tokens(gguf, case):
    from exporter.gate.evaluate import batched_generations
    from exporter.gate.session_outputs import session_outputs

    own = batched_generations(gguf, PROMPTS, BUDGETS, vocab=512)
    _, gens, how = session_outputs(gguf, _samples(), BUDGETS, 512, _candidates(case, own, seed=1))
    assert gens == own
    assert (how["continued"] == 0) == (case == "own")
