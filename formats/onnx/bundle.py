"""Where the files of an ONNX export live: the transformers.js layout, which other clients read too.

    dist/onnx/                      <- pass this dir to any client (and to `lorax check`)
      config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja ...
      genai_config.json             onnxruntime-genai (its decoder points at the primary graph)
      lorax.json                    what was written: variants, primary, quantization, provenance
      onnx/model.onnx               float32 (transformers.js dtype "fp32")
      onnx/model_fp16.onnx          float16 ("fp16")
      onnx/model_quantized.onnx     8-bit weights ("q8")
      onnx/model_q4.onnx            4-bit weights ("q4")
      onnx/<name>.onnx.data         a graph's weights, when it is past protobuf's 2 GB limit

transformers.js 4.x looks for the graph one level below config.json, in `onnx/`, under a file name
per dtype (the table below); optimum's ORTModelForCausalLM and onnxruntime-genai read the same dir.
`lorax.json` records which variants exist and which one is primary (the one asked for: it is what
the parity gate measures and what genai_config.json names). Pure path logic, no onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

from formats.errors import FormatError

SUBDIR = "onnx"
META = "lorax.json"

# lorax variant (its --onnx-dtype / --onnx-quant name) -> (file under onnx/, transformers.js dtype)
VARIANTS: dict[str, tuple[str, str]] = {
    "float32": ("model.onnx", "fp32"),
    "float16": ("model_fp16.onnx", "fp16"),
    "int8": ("model_quantized.onnx", "q8"),
    "int4": ("model_q4.onnx", "q4"),
}


def graph_path(root: Path, variant: str) -> Path:
    """The graph file of `variant` inside the export dir `root`."""
    return root / SUBDIR / VARIANTS[variant][0]


def read_meta(root: Path) -> dict:
    path = root / META
    return json.loads(path.read_text()) if path.is_file() else {}


def primary_variant(root: Path) -> str:
    """The variant lorax.json names primary (an export with --onnx-quant int4 also holds float32)."""
    meta = read_meta(root)
    return meta.get("primary") or meta.get("quant") or meta.get("dtype") or "float32"


def export_root(path: str | Path) -> Path | None:
    """The export dir for a path a user may pass: the dir itself, its parent's `onnx/` (dist/), or a
    graph file inside `onnx/`. None when there is no graph there (then it is not an ONNX export)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return path.parent.parent if path.parent.name == SUBDIR else path.parent
    for cand in (path, path / SUBDIR):
        if any((cand / SUBDIR / f).is_file() for f, _ in VARIANTS.values()):
            return cand
    return None


def resolve_graph(path: str | Path, variant: str | None = None) -> tuple[Path, Path, str]:
    """(export dir, graph file, variant) for `path`; `variant` defaults to the export's primary one."""
    path = Path(path)
    root = export_root(path)
    if root is None:
        names = ", ".join(f"{SUBDIR}/{f}" for f, _ in VARIANTS.values())
        raise FormatError(f"{path}: no ONNX graph ({names}); pass the dir `lorax export --onnx` wrote (DIR/onnx)")
    if path.is_file():
        by_file = {f: v for v, (f, _) in VARIANTS.items()}
        return root, path, by_file.get(path.name, primary_variant(root))
    variant = variant or primary_variant(root)
    if variant not in VARIANTS:
        raise FormatError(f"unknown ONNX variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    graph = graph_path(root, variant)
    if not graph.is_file():
        have = [v for v in VARIANTS if graph_path(root, v).is_file()]
        raise FormatError(f"{root}: no {variant} graph ({graph.relative_to(root)}); this export has: {', '.join(have)}")
    return root, graph, variant


def variants_in(root: Path) -> list[str]:
    """Every variant whose graph is in `root`, in the table's order."""
    return [v for v in VARIANTS if graph_path(root, v).is_file()]
