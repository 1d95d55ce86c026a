"""`lorax export` end to end on the tiny model + a QLoRA adapter, and the gate catching each breakage.

One honest export (merged + GGUF f32 + ONNX float32) is built per module and gated; then each
deliberately broken artifact named in the gate's issue is fed to `lorax check` and must fail (exit 1)
with the failing metric named in the report.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from adapters import LoraSpec, make_adapter

from exporter.cli.main import main


@pytest.fixture(scope="module")
def adapter(nf4_adapter) -> Path:
    return nf4_adapter


@pytest.fixture(scope="module")
def dist(adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "dist"
    rc = main(["export", str(adapter), "--out", str(out), "--gguf", "--quant", "f32", "--onnx"])
    # f16/q8_0/q4_k_m are gated on SmolLM2 (slow tests, demo): the random tiny model's next-token
    # distributions are nearly flat, so f16 rounding alone flips ~4% of near-tied top-1 tokens here
    # (measured: f16 KLD 3e-6 but top-1 96%), which says nothing about the file.
    assert rc == 0, (out / "report.md").read_text() if (out / "report.md").exists() else "no report"
    return out


def _report(d: Path) -> dict:
    return json.loads((d / "report.json").read_text())


def test_honest_export_passes_every_target(dist):
    rep = _report(dist)
    assert rep["passed"] is True
    kinds = {(t["format"], t["dtype"]) for t in rep["targets"]}
    assert kinds == {("hf", "float32"), ("gguf", "f32"), ("onnx", "float32")}
    by = {(t["format"], t["dtype"]): t["metrics"] for t in rep["targets"]}
    # exact paths: the merge and the f32 conversions reproduce the trained model
    assert by[("hf", "float32")]["max_abs_logit"] <= 1e-4
    assert by[("gguf", "f32")]["kld_mean"] <= 1e-4 and by[("gguf", "f32")]["top1"] >= 0.99
    assert by[("onnx", "float32")]["max_abs_logit"] <= 1e-3
    meta = json.loads((dist / "lorax.json").read_text())
    assert meta["gate"]["passed"] is True
    gguf = {a["type"]: a for a in meta["artifacts"] if a["format"] == "gguf"}
    assert set(gguf) == {"f32"} and all(len(a["sha256"]) == 64 for a in gguf.values())
    assert (dist / "merged" / "model.safetensors").exists() or list((dist / "merged").glob("*.safetensors"))
    # every other published file with the sha256 of its bytes on disk (the merged weights' taken from the
    # merge's own record, which its writer hashed on the way out)
    from lorax_common.hashing import sha256_file

    published = {str(f.relative_to(dist)) for f in dist.rglob("*") if f.is_file() and f.suffix != ".gguf"
                 and f.name != "lorax.json" and not f.name.startswith("report") and f.name not in ("kld.svg", "README.md")}
    assert set(meta["files"]) == published and any(f.startswith("merged/") for f in published)
    assert all(meta["files"][f] == sha256_file(dist / f) for f in published)


def test_existing_output_needs_force(adapter, dist, capsys):
    before = (dist / "report.json").read_text()
    assert main(["export", str(adapter), "--out", str(dist), "--gguf"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (dist / "report.json").read_text() == before


def _check(adapter: Path, artifact: Path, report: Path) -> tuple[int, dict]:
    rc = main(["check", str(adapter), str(artifact), "--report", str(report)])
    return rc, _report(report)["targets"][0]


def test_adapter_left_out_of_the_merge_fails(adapter, tiny_model_dir, tmp_path):
    rc, t = _check(adapter, tiny_model_dir, tmp_path / "r")  # the base alone, as if the merge skipped the LoRA
    assert rc == 1 and not t["passed"]
    assert any(f.startswith("kld_mean") for f in t["failures"]), t["failures"]


def test_gguf_with_qk_permutation_undone_fails(adapter, dist, tmp_path, monkeypatch):
    from formats.gguf import arch
    from formats.gguf.writer import write_gguf

    monkeypatch.setitem(arch.ARCHS, "llama", dataclasses.replace(arch.ARCHS["llama"], permute_qk=False))
    bad = write_gguf(dist / "merged", tmp_path / "unpermuted-f32.gguf", "f32", progress=False)
    rc, t = _check(adapter, bad, tmp_path / "r")
    assert rc == 1 and any(f.startswith("kld_mean") for f in t["failures"]), t["failures"]


def test_onnx_export_of_the_base_fails(adapter, tiny_model_dir, tmp_path):
    from formats.onnx.export import export_onnx

    export_onnx(tiny_model_dir, tmp_path / "onnx")
    rc, t = _check(adapter, tmp_path / "onnx", tmp_path / "r")
    assert rc == 1 and t["format"] == "onnx"
    assert any(f.startswith("kld_mean") for f in t["failures"]), t["failures"]


def test_baseline_against_a_retrained_adapter_fails(adapter, dist, tiny_model_dir, tmp_path, capsys):
    prompts = adapter / "eval.jsonl"
    golden = tmp_path / "golden.json"
    gguf = dist / "model-f32.gguf"
    assert main(["baseline", "save", str(gguf), "--prompts", str(prompts), "--tokenizer", str(dist / "merged"),
                 "--out", str(golden)]) == 0
    # the same build again: no drift
    assert main(["baseline", "compare", str(gguf), "--baseline", str(golden)]) == 0
    # "retrained": another adapter (other seed) through the same export path
    retrained = tmp_path / "adapter2"
    make_adapter(tiny_model_dir, retrained, trained_on="nf4", double_quant=True, spec=LoraSpec(seed=1))
    assert main(["export", str(retrained), "--out", str(tmp_path / "dist2"), "--gguf", "--quant", "f32",
                 "--no-check"]) == 0
    capsys.readouterr()
    assert main(["baseline", "compare", str(tmp_path / "dist2" / "model-f32.gguf"), "--baseline", str(golden)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is False and any(f.startswith("kld_mean") for f in out["failures"])


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_gguf_is_gated_on_the_base_as_trained(tiny_model_dir, tmp_path, rslora):
    """--gguf-adapter on a QLoRA adapter ships the base as trained beside the LoRA and gates the pair through
    llama.cpp at the f32 limits; the same LoRA over the original base is shown, ungated, far outside them."""
    adapter = tmp_path / "adapter"
    make_adapter(tiny_model_dir, adapter, trained_on="nf4", spec=LoraSpec(seed=3, use_rslora=rslora, r=4, alpha=8))
    out = tmp_path / "dist"
    rc = main(["export", str(adapter), "--out", str(out), "--gguf", "--quant", "f32", "--gguf-adapter",
               "--gen-tokens", "4"])
    by = {t["name"]: t for t in _report(out)["targets"]}
    assert rc == 0, {k: t["failures"] for k, t in by.items()}
    pair = by["base-as-trained-f32.gguf + model-lora-f32.gguf"]
    assert pair["gated"] and pair["passed"] and pair["metrics"]["kld_mean"] <= 1e-4, pair
    naive = by["original-base + model-lora-f32.gguf"]
    assert not naive["gated"] and "original (unquantized) base" in naive["note"]
    assert naive["metrics"]["kld_mean"] > 100 * pair["metrics"]["kld_mean"], (naive["metrics"], pair["metrics"])
    assert "original-base + model-lora-f32.gguf" in (out / "report.md").read_text()
    kinds = {a["kind"]: a["path"] for a in json.loads((out / "lorax.json").read_text())["artifacts"]}
    assert kinds["base"] == "base-as-trained-f32.gguf" and kinds["lora"] == "model-lora-f32.gguf"
    # the pair can be checked again by hand, as a user would
    assert main(["check", str(adapter), str(out / "base-as-trained-f32.gguf"), "--lora",
                 str(out / "model-lora-f32.gguf"), "--report", str(tmp_path / "r")]) == 0


def test_small_prompt_set_honest_export_passes(adapter, tmp_path):
    """4 chat prompts with answers (~100 positions): p99 is then the maximum, so tail limits are reported but
    not applied; an honest export passes, and the report says why p99 was not gated."""
    prompts = tmp_path / "four.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Name a city.", "Paris."), ("Count to three.", "one two three"),
                         ("What color is the sky?", "blue"), ("Say hi.", "hi")]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dist"
    rc = main(["export", str(adapter), "--out", str(out), "--gguf", "--quant", "f32", "--prompts", str(prompts)])
    rep = _report(out)
    assert rc == 0 and rep["samples"] == 4 and rep["tokens"] < 400
    for t in rep["targets"]:
        assert "kld_p99" not in t["thresholds"] and any("kld_p99" in u for u in t["untested"]), t
    assert "Limits not applied" in (out / "report.md").read_text()


def test_a_target_that_cannot_run_is_a_failed_row_and_the_rest_are_measured(adapter, dist, tmp_path, capsys):
    import shutil

    broken = tmp_path / "onnx-damaged"
    shutil.copytree(dist / "onnx", broken)
    model = broken / "onnx" / "model.onnx"
    model.write_bytes(model.read_bytes()[:4096])  # metadata says float32; onnxruntime cannot load it
    rc = main(["check", str(adapter), str(broken), str(dist / "model-f32.gguf"), "--report", str(tmp_path / "r")])
    by = {t["name"]: t for t in _report(tmp_path / "r")["targets"]}
    assert rc == 1
    bad = by["onnx:onnx-damaged"]
    assert not bad["passed"] and bad["failures"][0].startswith("could not be measured"), bad
    assert by["model-f32.gguf"]["passed"] and by["model-f32.gguf"]["metrics"]["kld_mean"] <= 1e-4
    # a GGUF cut inside its header or inside its tensor data is bad input, refused before the gate runs: one
    # line naming which, exit 2
    data = (dist / "model-f32.gguf").read_bytes()
    for cut, says in ((200, "GGUF header is truncated or corrupt"), (20000, "truncated: tensor data ends at byte")):
        truncated = tmp_path / f"truncated-{cut}-f32.gguf"
        truncated.write_bytes(data[:cut])
        capsys.readouterr()
        assert main(["check", str(adapter), str(truncated)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_export_of_a_plain_peft_double_quant_adapter_needs_and_takes_double_quant(tiny_model_dir, tmp_path):
    """Without lorax.json, --trained-on nf4 alone rebuilds a merge and a reference that agree with each other
    but not with the trained model; --double-quant (now on export/check too) makes both exact."""
    from adapters import logits, sample_ids

    from formats.hf.runner import HFRunner

    adapter = tmp_path / "peft"
    trained = make_adapter(tiny_model_dir, adapter, trained_on="nf4", double_quant=True, spec=LoraSpec(seed=5, lorax_json=False))
    ids = sample_ids(tiny_model_dir)
    truth = logits(trained, ids)
    gaps = {}
    for flag in ([], ["--double-quant"]):
        out = tmp_path / f"dist{len(flag)}"
        assert main(["export", str(adapter), "--out", str(out), "--gguf", "--quant", "f32", "--trained-on", "nf4",
                     *flag, "--gen-tokens", "4"]) == 0
        merged = HFRunner(out / "merged")
        gaps[bool(flag)] = max(float(abs(merged.logits(i) - t).max()) for i, t in zip(ids, truth, strict=True))
    assert gaps[True] <= 1e-4 < gaps[False], gaps


def test_baseline_compare_reuses_the_saved_sample_selection(adapter, dist, tmp_path, capsys):
    prompts, golden, gguf = adapter / "eval.jsonl", tmp_path / "golden.json", dist / "model-f32.gguf"
    assert main(["baseline", "save", str(gguf), "--prompts", str(prompts), "--tokenizer", str(dist / "merged"),
                 "--max-samples", "2", "--out", str(golden)]) == 0
    data = json.loads(golden.read_text())
    assert len(data["sequences"]) == 2 and data["selection"]["max_samples"] == 2
    capsys.readouterr()
    assert main(["baseline", "compare", str(gguf), "--baseline", str(golden), "--prompts", str(prompts)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["kld_mean"] < 1e-6
