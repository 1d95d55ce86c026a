"""Run `lorax ARGS...` in this process and SIGKILL it at one stage: a real kill -9 at a known point.

    python tests/kill_at.py gate export adapter/ --out dist/ --gguf

Used by tests/test_crash_recovery.py. The product has no kill hook: this script wraps one function of
the stage (from the test side) so the process dies exactly there, with that stage's files half-written.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

# stage -> (module, attribute, calls let through before the kill)
STAGES: dict[str, tuple[str, str, int]] = {
    "merge": ("formats.hf.writer", "ShardedWriter._emit", 1),        # safetensors header written, no tensor bytes
    "gguf": ("formats.gguf.writer", "_StreamedTensor.tofile", 2),     # two tensors of the GGUF written
    "quantize": ("llama_cpp", "llama_model_quantize", 0),             # staged f32 intermediate, quant under way
    "onnx": ("formats.onnx.export", "write_side_files", 0),           # model.onnx traced into staging
    "gate": ("exporter.gate.check", "check", 0),                     # dist/ published, gate never ran
}


def arm(stage: str) -> None:
    module, attr, let_through = STAGES[stage]
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] > let_through:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


if __name__ == "__main__":
    arm(sys.argv[1])
    from exporter.cli.main import main

    sys.exit(main(sys.argv[2:]))
