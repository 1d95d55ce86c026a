"""The CLI shell: instant --help, a useful --version, and one-line errors with exit codes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from exporter.cli.main import COMMANDS, main


def test_help_is_instant_and_imports_no_torch():
    code = (
        "import sys, time; t = time.perf_counter(); from exporter.cli.main import main; "
        "rc = main(['--help']); "
        "assert 'torch' not in sys.modules, 'torch imported by --help'; "
        "assert 'transformers' not in sys.modules; print(rc, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rc, elapsed = out.strip().splitlines()[-1].split()
    assert rc == "0"
    assert float(elapsed) < 1.0


def test_help_lists_every_registered_command_and_console_script_runs():
    t = time.perf_counter()
    lorax = Path(sys.executable).with_name("lorax")  # the console script of this environment
    out = subprocess.run([str(lorax), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert time.perf_counter() - t < 1.5  # wall time of a fresh process incl. interpreter start
    for name in COMMANDS:
        assert name in out.stdout


def test_version_names_the_numeric_stack(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    for name in ("lorax 0.1.0", "torch", "transformers", "peft", "bitsandbytes", "llama-cpp-python",
                 "onnxruntime", "CUDA usable"):
        assert name in out
    assert "not installed" not in out.split("CUDA usable")[0].replace("onnxruntime-gpu", "")


def test_unknown_command_fails():
    assert main(["no-such-command"]) != 0
