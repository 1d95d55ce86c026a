"""Open an artifact path as a gate target: which format, which dtype, and how to load a runner for it.

    dist/model-q4_k_m.gguf                          -> gguf / q4_k_m / GGUFRunner
    dist/base-as-trained-f32.gguf + --lora L.gguf   -> gguf / f32 / GGUFRunner with the LoRA applied
    dist/onnx/                                      -> onnx / float32|float16|int8|int4 / ONNXRunner
    dist/merged/                                    -> hf / the config's dtype / HFRunner

A Target only names the artifact; `open()` loads it. The gate opens one target at a time and closes it
before the next, so peak memory is the reference's outputs plus one loaded artifact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import LoraxError
from formats.runner import Runner


@dataclass
class Target:
    name: str
    format: str
    dtype: str
    path: Path
    lora: Path | None = None  # a LoRA GGUF llama.cpp applies on top of `path`
    # False: measured and shown in the report, labelled with `note`, but never fails the gate
    gated: bool = True
    note: str = ""
    opener: Callable[[], Runner] | None = None  # overrides the default loader (e.g. a file built lazily)

    def open(self) -> Runner:
        if self.opener is not None:
            return self.opener()
        return open_runner(self.format, self.path, name=self.name, lora=self.lora, dtype=self.dtype)


def open_runner(fmt: str, path: Path, name: str | None = None, lora: Path | None = None,
                dtype: str = "float32") -> Runner:
    """A loaded runner of one artifact (format already known)."""
    if fmt == "gguf":
        from formats.gguf.runner import GGUFRunner

        return GGUFRunner(path, lora_path=lora, name=name)
    if fmt == "onnx":
        from formats.onnx.runner import ONNXRunner

        return ONNXRunner(path, name=name)
    from formats.hf.runner import HFRunner

    return HFRunner(path, dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "float32", name=name)


def gguf_dtype(path: Path) -> str:
    """File type from the GGUF header (general.file_type), as lowercase names: f32, q8_0, q4_k_m, ..."""
    from gguf import LlamaFileType

    from formats.errors import FormatError
    from formats.gguf.header import read_values

    try:
        value = read_values(path, {"general.file_type"}).get("general.file_type")
    except FormatError as e:
        raise LoraxError(f"not a readable GGUF file: {e}; re-export it") from None
    if value is None:
        raise LoraxError(f"{path}: GGUF has no general.file_type, so its thresholds are unknown; "
                         "re-export it with lorax or llama.cpp's converter")
    try:
        name = LlamaFileType(int(value)).name.lower()
    except ValueError:
        raise LoraxError(f"{path}: general.file_type {value} is not a llama.cpp file type lorax knows") from None
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


def open_target(path: str | Path, lora: str | Path | None = None) -> Target:
    """Name the artifact at `path` (format, dtype from its own metadata); nothing is loaded yet."""
    path = Path(path)
    if not path.exists():
        raise LoraxError(f"{path}: no such artifact; pass a .gguf file, an ONNX dir or a merged HF dir")
    if lora is not None and path.suffix != ".gguf":
        raise LoraxError(f"--lora applies to GGUF artifacts (llama.cpp LoRA), not {path}")
    if path.suffix == ".gguf":
        lora = Path(lora) if lora else None
        name = path.name + (f" + {lora.name}" if lora else "")
        return Target(name, "gguf", gguf_dtype(path), path, lora=lora)
    if (path.is_dir() or path.suffix == ".onnx") and onnx_dir(path) is not None:
        from formats.onnx.bundle import resolve_graph

        _, _, variant = resolve_graph(path)  # a graph file: that variant, else the export's primary one
        return Target(f"onnx:{path.name}", "onnx", variant, path)
    if path.is_dir() and (path / "config.json").is_file():
        return Target(f"hf:{path.name}", "hf", hf_dtype(path), path)
    raise LoraxError(f"{path}: not a GGUF file, an ONNX dir (model.onnx) or an HF model dir (config.json)")
