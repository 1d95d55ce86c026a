"""The parity gate on HF targets of the tiny model: honest copies pass, each kind of breakage fails.

Reference here is a plain HF dir (the gate's non-adapter mode), so these tests need no merge or
converter; tests of GGUF/ONNX/adapter breakage live beside those formats' tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from exporter.cli.main import main
from exporter.errors import LoraxError
from exporter.gate import baseline, metrics
from exporter.gate.thresholds import limits_for, parse_overrides, violations

PROMPTS = [  # one record form per file, as for training data
    {"messages": [{"role": "user", "content": "Name a city."}, {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "user", "content": "The model adapter weight"},
                  {"role": "assistant", "content": "merge export token"}]},
    {"messages": [{"role": "user", "content": "Number 123. The quantized layer check drift report."},
                  {"role": "assistant", "content": "train loss step batch rank alpha"}]},
    {"messages": [{"role": "user", "content": "Grüße, naïve café — 東京 🚀"},
                  {"role": "assistant", "content": "def f(x):\n    return x * 2 + 1\n"}]},
]


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return p


def _copy(src: Path, dst: Path, edit_weights=None, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_weights:
        sd = load_file(dst / "model.safetensors")
        edit_weights(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _check(capsys, ref: Path, target: Path, prompts: Path, report: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["check", str(ref), str(target), "--prompts", str(prompts), "--report", str(report), *extra])
    capsys.readouterr()
    return rc, json.loads((report / "report.json").read_text())


def test_honest_copy_passes_and_report_is_complete(tiny_model_dir, tmp_path, prompts_file, capsys):
    target = _copy(tiny_model_dir, tmp_path / "merged")
    rc, rep = _check(capsys, tiny_model_dir, target, prompts_file, tmp_path / "r")
    assert rc == 0 and rep["passed"] is True
    (t,) = rep["targets"]
    assert {"name", "format", "path", "metrics", "thresholds", "passed"} <= set(t)
    assert t["metrics"]["kld_mean"] < 1e-9 and t["metrics"]["top1"] == 1.0
    assert t["metrics"]["greedy_match"] == 1.0 and t["metrics"]["max_abs_logit"] < 1e-4
    md = (tmp_path / "r" / "report.md").read_text()
    assert "PASSED" in md and "hf:merged" in md
    assert (tmp_path / "r" / "kld.svg").read_text().startswith("<svg")


def _scale(name: str, factor: float):
    def edit(sd):
        sd[name] = sd[name] * factor
    return edit


@pytest.mark.parametrize(
    "case, edit_weights, edit_config, metric",
    [
        ("perturbed-weights", _scale("model.layers.0.mlp.down_proj.weight", 3.0), None, "kld_mean"),
        ("wrong-rope-theta", None, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                                                       rope_theta=100.0), "kld_mean"),
    ],
)
def test_broken_target_fails_naming_the_metric(tiny_model_dir, tmp_path, prompts_file, capsys, case,
                                               edit_weights, edit_config, metric):
    target = _copy(tiny_model_dir, tmp_path / case, edit_weights, edit_config)
    rc, rep = _check(capsys, tiny_model_dir, target, prompts_file, tmp_path / "r")
    assert rc == 1 and rep["passed"] is False
    (t,) = rep["targets"]
    assert t["passed"] is False and any(f.startswith(metric) for f in t["failures"]), t["failures"]
    assert "FAIL" in (tmp_path / "r" / "report.md").read_text()


def test_tokenizer_with_a_merge_removed_fails(tiny_model_dir, tmp_path, prompts_file, capsys):
    def drop_merge(d: Path):
        from transformers import AutoTokenizer

        tok = json.loads((d / "tokenizer.json").read_text())
        used = set(AutoTokenizer.from_pretrained(d).tokenize(PROMPTS[0]["messages"][0]["content"] + " user"))
        merges = tok["model"]["merges"]
        # drop the first merge whose product the prompts actually use
        i = next(i for i, m in enumerate(merges) if "".join(m) in used)
        tok["model"]["merges"] = merges[:i] + merges[i + 1:]
        (d / "tokenizer.json").write_text(json.dumps(tok))

    target = _copy(tiny_model_dir, tmp_path / "badtok")
    drop_merge(target)
    rc, rep = _check(capsys, tiny_model_dir, target, prompts_file, tmp_path / "r")
    assert rc == 1
    (t,) = rep["targets"]
    assert any(f.startswith("tokenizer:") for f in t["failures"]), t["failures"]
    # the weights are identical: only the tokenizer check can have caught it
    assert t["metrics"]["kld_mean"] < 1e-9


def test_threshold_overrides_and_unknown_metric(tiny_model_dir, tmp_path, prompts_file, capsys):
    target = _copy(tiny_model_dir, tmp_path / "m", _scale("model.layers.1.mlp.up_proj.weight", 1.5))
    rc, rep = _check(capsys, tiny_model_dir, target, prompts_file, tmp_path / "r")
    kld = rep["targets"][0]["metrics"]["kld_mean"]
    assert rc == 1 and kld > 1e-4
    # loosened explicitly by the user, it passes; the override is recorded in the report
    rc, rep = _check(capsys, tiny_model_dir, target, prompts_file, tmp_path / "r2",
                     "--threshold", f"kld_mean={kld * 2}", "--threshold", "kld_p99=none",
                     "--threshold", "top1=0", "--threshold", "ppl_ratio=none", "--threshold", "greedy_match=0")
    assert rc == 0, rep["targets"][0]["failures"]
    assert rep["targets"][0]["thresholds"]["kld_mean"] == pytest.approx(kld * 2)
    with pytest.raises(ValueError, match="unknown metric 'kdl'"):
        parse_overrides(("kdl=1",), None)


def test_violations_table_directions():
    lim = limits_for("gguf", "q8_0")
    assert violations({"kld_mean": 0.001, "top1": 0.99}, lim) == []
    assert violations({"kld_mean": 0.5, "top1": 0.5}, lim) == ["kld_mean 0.5 > 0.015", "top1 0.5 < 0.92"]
    assert violations({"kld_mean": float("nan")}, lim) == ["kld_mean is NaN"]
    with pytest.raises(LoraxError, match="gguf type 'q3_k_xs' cannot be gated.*supported: f32"):
        limits_for("gguf", "q3_k_xs")


def test_metrics_definitions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 11)).astype(np.float32)
    assert metrics.kld_per_position(a, a).max() < 1e-12
    b = a.copy()
    b[3] = -b[3]
    k = metrics.kld_per_position(a, b)
    p = np.exp(metrics.log_softmax(a[3]))
    q = np.exp(metrics.log_softmax(b[3]))
    assert k[3] == pytest.approx(float((p * np.log(p / q)).sum()))
    assert metrics.top1_agreement(a, b) == pytest.approx(6 / 7) or metrics.top1_agreement(a, b) < 1
    ids = list(rng.integers(0, 11, size=7))
    assert metrics.perplexity(a, ids) == pytest.approx(np.exp(metrics.nll(a, ids).mean()))


def _whole_sequence(ref, tgt, ids, scored):
    """The metrics of one sequence as whole-array float64 formulas (the definitions, no chunking)."""
    def ls(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = ls(ref), ls(tgt)
    kld = np.maximum((np.exp(p) * (p - q)).sum(axis=-1), 0.0)
    rows = np.arange(len(ids) - 1)[np.asarray(scored[1:], dtype=bool)]
    nxt = np.asarray(ids)[rows + 1]
    return kld, -p[rows, nxt], -q[rows, nxt]


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100])
def test_sequence_metrics_in_chunks_are_the_whole_array_formulas_bit_for_bit(monkeypatch, chunk_rows):
    """_sequence computes a few positions at a time (CHUNK_BYTES); every metric reduces along one position's
    vocabulary, so chunks of 1, 3 (a ragged last one), 7 (the last holding the position with no next id) or all
    of the 7 positions give exactly the numbers of the whole-array formulas."""
    rng = np.random.default_rng(3)
    ref = (rng.normal(size=(7, 301)) * 4).astype(np.float32)
    tgt = ref + rng.normal(size=ref.shape).astype(np.float32)
    ids = rng.integers(0, 301, size=7).tolist()
    scored = [False, False, True, True, False, True, True]
    monkeypatch.setattr(metrics, "CHUNK_BYTES", chunk_rows * 301 * 8)
    kld, agree, mal, nll_r, nll_t = metrics._sequence(ref, tgt, ids, scored)
    want_kld, want_r, want_t = _whole_sequence(ref, tgt, ids, scored)
    assert np.array_equal(kld, want_kld) and kld.min() > 0
    assert np.array_equal(nll_r, want_r) and np.array_equal(nll_t, want_t) and len(nll_r) == 4
    assert np.array_equal(agree, ref.argmax(-1) == tgt.argmax(-1))
    assert mal == float(np.abs(ref.astype(np.float64) - tgt).max())


def test_log_softmax_leaves_its_input_alone():
    x = np.random.default_rng(4).normal(size=(3, 9))
    kept = x.copy()
    out = metrics.log_softmax(x)
    assert np.array_equal(x, kept) and out is not x
    assert np.allclose(np.exp(out).sum(-1), 1.0)


def test_baseline_save_compare_and_drift(tiny_model_dir, tmp_path, prompts_file, capsys):
    golden = tmp_path / "golden.json"
    assert main(["baseline", "save", str(tiny_model_dir), "--prompts", str(prompts_file), "--out", str(golden)]) == 0
    assert main(["baseline", "compare", str(tiny_model_dir), "--baseline", str(golden),
                 "--prompts", str(prompts_file)]) == 0
    out = capsys.readouterr().out
    assert '"passed": true' in out
    # existing baseline is not overwritten without --force
    assert main(["baseline", "save", str(tiny_model_dir), "--prompts", str(prompts_file), "--out", str(golden)]) == 2
    # a "retrained" model drifts past the limits
    drifted = _copy(tiny_model_dir, tmp_path / "retrained", _scale("model.layers.0.self_attn.o_proj.weight", 4.0))
    assert main(["baseline", "compare", str(drifted), "--baseline", str(golden)]) == 1
    assert "kld_mean" in capsys.readouterr().err


def test_baseline_refuses_other_prompts_and_tokenizers(tiny_model_dir, tmp_path, prompts_file, capsys):
    golden = tmp_path / "golden.json"
    assert main(["baseline", "save", str(tiny_model_dir), "--prompts", str(prompts_file), "--out", str(golden)]) == 0
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a completely different prompt"}) + "\n")
    capsys.readouterr()
    assert main(["baseline", "compare", str(tiny_model_dir), "--baseline", str(golden), "--prompts", str(other)]) == 2
    assert "other prompts" in capsys.readouterr().err
    data = json.loads(golden.read_text())
    data["sequences"][0]["ids"] = data["sequences"][0]["ids"][::-1]
    golden.write_text(json.dumps(data))
    assert main(["baseline", "compare", str(tiny_model_dir), "--baseline", str(golden)]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["baseline", "compare", str(tiny_model_dir), "--baseline", str(tmp_path / "junk.json")]) == 2


def test_coarse_kld_is_a_lower_bound_of_full_kld():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 50)) * 3, rng.normal(size=(5, 50)) * 3
    la, lb = metrics.log_softmax(a), metrics.log_softmax(b)
    idx, vals = baseline.topk(la, 8)
    coarse = baseline.coarse_kld(idx, vals, lb)
    full = metrics.kld_per_position(a, b)
    assert np.all(coarse <= full + 1e-9) and np.all(coarse > 0)
