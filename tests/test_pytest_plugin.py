"""The pytest plugin (exporter/pytest_plugin.py) run the way CI runs it: `pytest dist/ baselines/ --junitxml`
gives one row per shipped file and per baseline; swapping one GGUF for the base without the adapter fails
exactly that row, with its metrics named."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from exporter.cli.main import main


def _pytest(cwd: Path, *args: str) -> tuple[int, dict[str, str | None]]:
    """Run pytest on the given paths; (exit code, testcase name -> failure message or None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTEST_ADDOPTS": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "j.xml",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    cases = {}
    for case in ET.parse(cwd / "j.xml").getroot().iter("testcase"):
        failure = case.find("failure")
        cases[case.get("name")] = None if failure is None else (failure.get("message") or "") + (failure.text or "")
    return proc.returncode, cases


@pytest.fixture(scope="module")
def work(nf4_adapter, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    # top-1 is set for the flat tiny model (q8_0 flips ~9% of near-tied argmaxes there); SmolLM2 gates it for real
    assert main(["export", str(nf4_adapter), "--out", str(root / "dist"), "--gguf", "--quant", "f32", "--quant",
                 "q8_0", "--threshold", "top1=0.5", "--gen-tokens", "4"]) == 0
    (root / "baselines").mkdir()
    assert main(["baseline", "save", str(root / "dist" / "model-f32.gguf"), "--prompts",
                 str(nf4_adapter / "eval.jsonl"), "--tokenizer", str(root / "dist" / "merged"), "--out",
                 str(root / "baselines" / "f32.json")]) == 0
    return root


def test_plugin_is_registered():
    eps = {ep.name: ep.value for ep in md.entry_points(group="pytest11")}
    assert eps.get("lorax") == "exporter.pytest_plugin"


def test_one_row_per_file_and_a_broken_file_fails_alone(work, tiny_model_dir):
    rc, cases = _pytest(work, "dist", "baselines")
    assert rc == 0, cases
    assert set(cases) == {"hf:merged", "model-f32.gguf", "model-q8_0.gguf", "drift:model-f32.gguf"}
    assert all(v is None for v in cases.values())

    from formats.gguf.export import GGUFOptions, export_gguf

    base_q8 = export_gguf(tiny_model_dir, work / "base", ["q8_0"], GGUFOptions(progress=False)).files[0].path
    shutil.copy(base_q8, work / "dist" / "model-q8_0.gguf")  # the base without the adapter, under the same name
    rc, cases = _pytest(work, "dist", "baselines")
    assert rc == 1
    failed = {k: v for k, v in cases.items() if v is not None}
    assert set(failed) == {"model-q8_0.gguf"}, failed
    assert "kld_mean" in failed["model-q8_0.gguf"]


def test_missing_adapter_is_said_clearly(work, tmp_path):
    dist = tmp_path / "dist"
    shutil.copytree(work / "dist", dist)
    rc, cases = _pytest(tmp_path, "dist", "--lorax-adapter", str(tmp_path / "gone"))
    assert rc == 1 and cases and all("is not here" in (v or "") for v in cases.values()), cases


def test_ci_recipe_catches_a_runtime_change(work, tmp_path):
    """docs/CI.md's steps on the tiny model: the same files and baselines under a 'new runtime' that reads the
    rope base differently (llama.cpp's kv override, injected into every Llama() by sitecustomize, as an upgraded
    runtime would change it) fail the drift row by name; the unchanged runtime passes it (the test above)."""
    shim = tmp_path / "runtime_b"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import llama_cpp\n"
        "_init = llama_cpp.Llama.__init__\n"
        "def _patched(self, *a, **kw):\n"
        "    kw['kv_overrides'] = {**(kw.get('kv_overrides') or {}), 'llama.rope.freq_base': 500.0}\n"
        "    _init(self, *a, **kw)\n"
        "llama_cpp.Llama.__init__ = _patched\n")
    os.environ["PYTHONPATH"], old = f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", os.environ.get(
        "PYTHONPATH")
    try:
        rc, cases = _pytest(work, "baselines")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert rc == 1 and set(cases) == {"drift:model-f32.gguf"}
    assert "kld_mean" in (cases["drift:model-f32.gguf"] or ""), cases
