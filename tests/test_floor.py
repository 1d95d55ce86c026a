"""The quantization floor (exporter.floor): lossy GGUF targets measured against the same type made from the
base as trained. The floor may only explain rounding: broken artifacts still fail with it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from exporter import thresholds
from exporter.cli import main
from exporter.floor import relax

FLOOR = {"kld_mean": 0.19, "kld_p99": 3.6, "top1": 0.85, "ppl_ratio": 1.01}


def test_relax_takes_the_worse_of_table_and_floor():
    table = {"kld_mean": 0.15, "kld_p99": 1.5, "top1": 0.80, "ppl_ratio": 1.30, "task_accuracy_drop": 0.05}
    out = relax(table, FLOOR, fixed=set())
    assert out["kld_mean"] == pytest.approx(0.19 * 1.25) and out["kld_p99"] == pytest.approx(3.6 * 1.5)
    assert out["top1"] == 0.80  # the table is already looser than floor - 0.02
    assert out["ppl_ratio"] == 1.30 and out["task_accuracy_drop"] == 0.05
    assert relax(table, {"kld_mean": 0.01}, fixed=set())["kld_mean"] == 0.15  # never tighter than the table
    assert relax(table, FLOOR, fixed={"kld_mean"})["kld_mean"] == 0.15  # the user's limit stands


@pytest.fixture(scope="module")
def adapter(nf4_adapter) -> Path:
    return nf4_adapter


@pytest.fixture(scope="module")
def dist(adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("floor") / "dist"
    assert main(["export", str(adapter), "--out", str(out), "--gguf", "--quant", "q8_0", "--no-check"]) == 0
    return out


def _check(adapter: Path, artifact: Path, report: Path, *flags: str) -> tuple[int, dict]:
    rc = main(["check", str(adapter), str(artifact), "--report", str(report), *flags])
    return rc, json.loads((report / "report.json").read_text())["targets"][0]


@pytest.fixture
def tight_q8_0(monkeypatch):
    """A KLD limit no q8_0 file meets, so the gate's verdict rests on the floor. top-1 is set aside: the
    random tiny model's next-token distributions are nearly flat, so any rounding flips ~10% of near-tied
    argmaxes (q8_0 here 0.91, its own floor 0.96); SmolLM2 gates top-1 for real (demo, slow tests)."""
    monkeypatch.setitem(thresholds.THRESHOLDS, ("gguf", "q8_0"),
                        {**thresholds.THRESHOLDS[("gguf", "q8_0")], "kld_mean": 1e-12, "top1": 0.5})


def test_floor_explains_honest_rounding(adapter, dist, tmp_path, tight_q8_0):
    rc, t = _check(adapter, dist / "model-q8_0.gguf", tmp_path / "off", "--floor", "off")
    assert rc == 1 and t["floor"] is None and t["failures"][0].startswith("kld_mean")
    rc, t = _check(adapter, dist / "model-q8_0.gguf", tmp_path / "auto")
    floor = t["floor"]
    assert rc == 0 and t["passed"], t
    assert 0 < floor["kld_mean"] < 1e-2 and t["thresholds"]["kld_mean"] == pytest.approx(1.25 * floor["kld_mean"])
    assert t["metrics"]["kld_mean"] <= t["thresholds"]["kld_mean"]
    assert "Quantization floor" in (tmp_path / "auto" / "report.md").read_text()


def test_floor_does_not_excuse_a_broken_file(adapter, dist, tmp_path, monkeypatch):
    from formats.gguf import arch
    from formats.gguf.writer import write_gguf

    monkeypatch.setitem(arch.ARCHS, "llama", dataclasses.replace(arch.ARCHS["llama"], permute_qk=False))
    bad = write_gguf(dist / "merged", tmp_path / "unpermuted-q8_0.gguf", "q8_0", progress=False)
    monkeypatch.undo()  # the floor's own file is written correctly
    rc, t = _check(adapter, bad, tmp_path / "r", "--floor", "always")
    assert t["floor"] is not None and t["floor"]["kld_mean"] < 1e-2
    assert rc == 1 and any(f.startswith("kld_mean") for f in t["failures"]), t["failures"]


def test_floor_does_not_excuse_a_missing_adapter(adapter, tiny_model_dir, tmp_path):
    from formats.gguf.export import export_gguf

    base_q8 = export_gguf(tiny_model_dir, tmp_path / "base", ["q8_0"], progress=False).files[0].path
    rc, t = _check(adapter, base_q8, tmp_path / "r", "--floor", "always")
    assert t["floor"] is not None
    assert rc == 1 and any(f.startswith("kld_mean") for f in t["failures"]), t["failures"]
