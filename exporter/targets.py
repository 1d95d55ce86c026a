"""Open an artifact path as a gate target: which format, which dtype, and a runner for it.

    dist/model-q4_k_m.gguf -> gguf / q4_k_m / GGUFRunner
    dist/onnx/             -> onnx / float32|float16|int8|int4 / ONNX runner
    dist/merged/           -> hf / the config's dtype / HFRunner
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import LoraxError


@dataclass
class Target:
    name: str
    format: str
    dtype: str
    path: Path
    runner: object  # formats.runner.Runner


def gguf_dtype(path: Path) -> str:
    """File type from the GGUF header (general.file_type), as lowercase names: f32, q8_0, q4_k_m, ..."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        raise LoraxError(f"{path}: GGUF has no general.file_type; cannot pick thresholds (pass --dtype)")
    name = LlamaFileType(int(field.contents())).name.lower()
    return name.removeprefix("mostly_").removeprefix("all_")


def onnx_dir(path: Path) -> Path | None:
    """The export dir (config.json + onnx/model*.onnx, formats/onnx/bundle.py) for DIR/onnx, DIR or a graph file."""
    from formats.onnx.bundle import export_root

    return export_root(path)


def onnx_dtype(d: Path) -> str:
    """The variant the runner opens by default: lorax.json's primary (quant, else dtype)."""
    from formats.onnx.bundle import primary_variant

    return primary_variant(d)


def hf_dtype(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def open_target(path: str | Path, dtype: str | None = None) -> Target:
    path = Path(path)
    if not path.exists():
        raise LoraxError(f"{path}: no such artifact; pass a .gguf file, an ONNX dir or a merged HF dir")
    if path.suffix == ".gguf":
        from formats.gguf.runner import GGUFRunner

        return Target(path.name, "gguf", dtype or gguf_dtype(path), path, GGUFRunner(path))
    if (path.is_dir() or path.suffix == ".onnx") and (od := onnx_dir(path)) is not None:
        from formats.onnx.runner import ONNXRunner

        runner = ONNXRunner(path if path.is_file() else od)  # a graph file: that variant, else the primary
        return Target(f"onnx:{path.name}", "onnx", dtype or runner.variant, od, runner)
    if path.is_dir() and (path / "config.json").is_file():
        from formats.hf import HFRunner

        dt = dtype or hf_dtype(path)
        return Target(f"hf:{path.name}", "hf", dt, path, HFRunner(path, dtype=dt))
    raise LoraxError(f"{path}: not a GGUF file, an ONNX dir (model.onnx) or an HF model dir (config.json)")
