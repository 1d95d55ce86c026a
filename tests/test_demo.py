"""The demo end to end on the real SmolLM2 (shortened): training helps, exports keep it, the gate passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, smollm2_dir):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["artifact"]: r for r in summary["rows"]}
    base = rows["base (no adapter)"]["accuracy"]
    adapter = rows["PEFT adapter (reference)"]["accuracy"]
    assert summary["gate_passed"] is True
    assert adapter >= base + 0.4, (base, adapter)  # the fine-tune measurably works
    exports = [r for name, r in rows.items() if name not in ("base (no adapter)", "PEFT adapter (reference)")]
    assert {r["artifact"].split()[0] for r in exports} >= {"hf", "gguf", "onnx"}
    for r in exports:
        assert abs(r["accuracy"] - adapter) <= 0.1, r  # each export keeps what training taught
    assert "llama-cli -m" in proc.stdout
