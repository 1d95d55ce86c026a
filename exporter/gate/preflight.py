"""Checks a gate command runs on its inputs before any model is loaded (each names the file and the fix).

    lorax check adapter/ dist/model-q8_0.gguf --report out/ --thresholds limits.yaml
    # damaged GGUF, unwritable --report, a thresholds file that is not a metric: number mapping -> exit 2 at once

The gate itself (exporter.gate.evaluate) would otherwise meet these files minutes in, as tracebacks from gguf-py,
tokenizers or yaml, or, for an unwritable --report, only after the whole gate ran.
"""

from __future__ import annotations

from pathlib import Path

from exporter.errors import LoraxError
from lorax_common.files import check_tokenizer_files, read_json_object, read_yaml


def check_artifacts(paths: list[str]) -> None:
    """A GGUF must pass import-gguf's validation; an HF/ONNX dir needs a config and tokenizer that parse."""
    from formats.gguf.inspect import inspect_gguf

    for p in map(Path, paths):
        if not p.exists():
            raise LoraxError(f"{p}: no such artifact; pass a .gguf file, an ONNX dir or a merged HF dir")
        if p.suffix == ".gguf":
            inspect_gguf(p)
        elif p.is_dir():
            for d in (p, p / "onnx"):
                if (d / "config.json").is_file():
                    read_json_object(d / "config.json", "a Hugging Face model config")
                    check_tokenizer_files(d)


def check_thresholds_yaml(path: str | None) -> None:
    """--thresholds FILE: UTF-8 YAML mapping each metric to a number (or null to ungate it)."""
    if not path:
        return
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise LoraxError(f"{path}: expected a mapping of metric: limit (e.g. kld_mean: 0.2), got {type(data).__name__}")
    for key, value in data.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise LoraxError(f"{path}: {key}: expected a number or null, got {value!r}")
