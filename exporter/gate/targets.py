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
    # overrides the default loader (e.g. a file built lazily); called with open()'s `tokens`
    opener: Callable[[int | None], Runner] | None = None

    def open(self, tokens: int | None = None) -> Runner:
        """Load the artifact. `tokens`: the longest sequence it will run, when known (gguf_context)."""
        if self.opener is not None:
            return self.opener(tokens)
        return open_runner(self.format, self.path, name=self.name, lora=self.lora, dtype=self.dtype, tokens=tokens)


def gguf_context(tokens: int | None) -> dict:
    """GGUFRunner's context for sequences of up to `tokens` (None: its default). llama-cpp-python's context
    holds n_ctx cells of KV cache for every layer, 4096 by default: at 1.18B (22 layers x 4 KV heads x 64,
    f32 K and V: 44 KB a cell) that is 185 MB, where the gate's samples (a few hundred tokens) need 512
    cells, 23 MB."""
    from formats.gguf.batch import stream_cells

    return {} if tokens is None else {"n_ctx": stream_cells(tokens)}


def open_runner(fmt: str, path: Path, name: str | None = None, lora: Path | None = None,
                dtype: str = "float32", tokens: int | None = None) -> Runner:
    """A loaded runner of one artifact (format already known); `tokens` sizes a GGUF's context."""
    if fmt == "gguf":
        from formats.gguf.runner import GGUFRunner

        return GGUFRunner(path, lora_path=lora, name=name, **gguf_context(tokens))
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
