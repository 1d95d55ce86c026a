"""dist/README.md (exporter.export.card): a model card generated from report.json. Its front matter parses, its
table carries report.json's numbers, and the run instructions work as printed (run from inside dist/)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.cli.main import main


@pytest.fixture(scope="module")
def dist(nf4_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "dist"
    assert main(["export", str(nf4_adapter), "--out", str(out), "--gguf", "--quant", "f32", "--onnx",
                 "--gen-tokens", "4"]) == 0
    return out


def _card(dist: Path) -> tuple[dict, str]:
    text = (dist / "README.md").read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _code(body: str, heading: str, lang: str) -> str:
    m = re.search(rf"### {re.escape(heading)}\n\n```{lang}\n(.*?)```", body, re.S)
    assert m, f"no {lang} block under {heading}"
    return m.group(1)


def test_front_matter_and_table_equal_the_report(dist):
    front, body = _card(dist)
    assert front["library_name"] == "gguf" and {"lorax", "lora", "qlora", "gguf", "onnx"} <= set(front["tags"])
    report = json.loads((dist / "report.json").read_text())
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("file", "---"):
            rows[cells[0]] = cells
    assert len(rows) == len(report["targets"]) >= 3
    for t in report["targets"]:
        rel = t["path"]
        assert (dist / rel).exists() and not Path(rel).is_absolute()  # portable: relative to dist/
        cells = rows[rel]
        assert (cells[1], cells[2]) == (t["format"], t["dtype"])
        assert float(cells[4]) == pytest.approx(t["metrics"]["kld_mean"], rel=1e-3, abs=1e-15)
        assert float(cells[5]) == pytest.approx(t["metrics"]["top1"], abs=1e-4)
        assert cells[7] == ("pass" if t["passed"] else "FAIL")


def _run(code: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_python_run_instructions_work_as_printed(dist):
    _, body = _card(dist)
    assert "llama-cli -m model-f32.gguf -cnv" in body
    _run(_code(body, "llama-cpp-python", "python"), dist)
    pytest.importorskip("onnxruntime_genai")
    _run(_code(body, "onnxruntime-genai", "python"), dist)


def test_transformers_js_run_instructions_work_as_printed(dist):
    from client_helpers import npm_dir, require_clients

    d = npm_dir()
    if d is None:
        assert not require_clients(), "LORAX_REQUIRE_CLIENTS=1 but npm/node are missing"
        pytest.skip("npm/node not installed")
    _, body = _card(dist)
    (dist / "node_modules").symlink_to(d / "node_modules")
    try:
        (dist / "card.mjs").write_text(_code(body, "transformers.js", "js"))
        proc = subprocess.run(["node", "card.mjs"], cwd=dist, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        (dist / "node_modules").unlink()
        (dist / "card.mjs").unlink(missing_ok=True)
