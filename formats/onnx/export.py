"""Export a merged HF causal LM to an ONNX decoder with KV cache, in the transformers.js layout.

    lorax export adapter/ --out dist/ --onnx [--onnx-dtype float16 | --onnx-quant int8|int4]
    # -> dist/onnx/: config.json, generation_config.json, tokenizer files, genai_config.json, lorax.json,
    #    onnx/model.onnx (+ onnx/model_quantized.onnx or onnx/model_q4.onnx; *.onnx.data past 2 GB)

    from formats.onnx.export import export_onnx
    export_onnx("merged/", "dist/onnx", dtype="float32", quant=None)

The llama family (formats/onnx/gqa.py GQA_ARCHS) gets onnxruntime-genai's model builder's graph,
GroupQueryAttention and fused norms, made pad-aware: on a CPU it decodes 1.3-1.5x faster than the
traced one. Other archs, and float16, are traced: optimum's own exporter cannot share an environment
with transformers 5 (../shared/DESIGN.md), so PyTorch's exporter (`torch.onnx.export(dynamo=True)`)
runs through a thin wrapper whose flat inputs/outputs carry optimum's names, in standard ONNX ops
(opset 20). Either way one graph serves both prefill (past length 0) and decode, with dynamic batch,
sequence and past lengths and optimum's I/O names. The folder is what transformers.js, onnxruntime-genai and optimum's
`ORTModelForCausalLM` load as written (file names: formats/onnx/bundle.py); a quantized export keeps
the float32 graph too (transformers.js's default dtype, and the one the quantizers start from).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.errors import FormatError
from formats.fsutil import atomic_dir
from formats.hf.compat import patch_dir
from formats.onnx import bundle, layout
from formats.onnx.genai import write_genai_config
from formats.onnx.quantize import QUANTIZERS, quantize, setting
from lorax_common.hashing import sha256_file

DTYPES = ("float32", "float16")

# Files copied from the HF dir so the ONNX dir loads on its own (every client reads config.json and
# generation_config.json from the export dir; the tokenizer and chat template make it a usable model).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "vocab.json", "merges.txt",
)


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote (paths are final, under `dir`)."""

    dir: Path
    model: Path  # the primary graph (the quantized one when quant is set)
    dtype: str
    quant: str | None
    bytes: int  # the primary graph with its external data
    files: dict[str, str] = field(default_factory=dict)  # path relative to dir -> sha256
    variants: dict[str, Path] = field(default_factory=dict)  # every graph written


def export_onnx(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32", quant: str | None = None,
                force: bool = False, opset: int | None = None, external_data: bool | None = None,
                importance: Mapping[str, np.ndarray] | None = None,
                calibration: Sequence[Sequence[int]] | None = None) -> OnnxExport:
    """Write the export dir `out_dir` (graphs under out_dir/onnx/) from the HF model in `hf_dir`, atomically.

    `out_dir` is the folder clients are pointed at (the pipeline passes DIR/onnx). A graph's weights go
    to <graph>.data when it is past protobuf's 2 GB limit (`external_data=None`) or as asked. `importance`
    (HF weight name -> mean x² per input column on calibration text) weighs the quantizer's rounding;
    `calibration` (token ids of real text) lets int4 run GPTQ (formats/onnx/gptq.py), without it int4 is
    quantize.UNCALIBRATED's setting. lorax.json records the setting that ran.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = _read_config(hf_dir)
    layout.check_arch(config)
    if dtype not in DTYPES:
        raise FormatError(f"unknown ONNX dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if quant is not None and quant not in QUANTIZERS:
        raise FormatError(f"unknown ONNX quantization {quant!r}; choose one of: {', '.join(QUANTIZERS)}")
    if quant is not None and dtype != "float32":
        # Both quantizers take a float32 graph (activations stay float32 at the graph level); a
        # float16 base would only add casts around every quantized MatMul.
        raise FormatError(f"--onnx-quant {quant} quantizes the float32 graph; drop --onnx-dtype {dtype}")

    from formats.onnx.decoder import trace_decoder
    from formats.onnx.gqa import build_gqa_decoder, uses_gqa
    from lorax_common.log import progress

    primary = quant or dtype
    stages = ["trace"] + (["quantize"] if quant else []) + ["side files"]
    with atomic_dir(out_dir, force=force) as tmp, progress(total=len(stages), desc="onnx export", unit="step") as bar:
        traced = bundle.graph_path(tmp, dtype)
        kind = "gqa" if uses_gqa(config, dtype) else "traced"
        if kind == "gqa":  # the fast graph where it was measured exact (formats/onnx/gqa.py)
            bar.set_postfix_str(f"building {config['model_type']} (GroupQueryAttention, {dtype})")
            build_gqa_decoder(hf_dir, traced, external_data=external_data)
        else:
            bar.set_postfix_str(f"tracing {config['model_type']} ({dtype})")
            trace_decoder(hf_dir, traced, dtype=dtype, opset=opset, external_data=external_data)
        bar.update()
        if quant:
            bar.set_postfix_str(f"quantizing ({quant})")
            quantize(traced, bundle.graph_path(tmp, quant), quant, hf_dir, external_data=external_data,
                     importance=importance, calibration=calibration)
            bar.update()
        bar.set_postfix_str("config + tokenizer")
        write_side_files(hf_dir, tmp, out_dir, variants=[dtype, *([quant] if quant else [])], primary=primary,
                         opset=opset, graph=kind,
                         quantization=setting(quant, bool(calibration)).describe() if quant else None)
        bar.update()
        files = _digests(tmp)
        graph = bundle.graph_path(tmp, primary)
        size = sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*"))
    variants = {v: bundle.graph_path(out_dir, v) for v in (dtype, quant) if v}
    return OnnxExport(out_dir, variants[primary], dtype, quant, size, files, variants)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != bundle.META}


def _read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FormatError(f"{hf_dir}: no config.json; pass a merged HF model dir (lorax merge writes one)")
    return json.loads(path.read_text())


def write_side_files(hf_dir: Path, root: Path, final_dir: Path, variants: list[str], primary: str,
                     opset: int | None, graph: str = "traced", quantization: dict | None = None) -> None:
    """Config, generation config, tokenizer, chat template, genai_config.json and lorax.json in `root`
    (the temp dir that becomes `final_dir`), readable by transformers 4.x and transformers.js."""
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, root / name)
    cfg = json.loads((root / "config.json").read_text())
    cfg["use_cache"] = True  # optimum only feeds the cache when the config says so
    (root / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    patch_dir(root)
    write_genai_config(root, bundle.graph_path(root, primary))
    import onnx
    import torch

    meta = {
        "kind": "onnx", "dtype": variants[0], "quant": primary if primary != variants[0] else None,
        "primary": primary,
        "variants": {v: bundle.graph_path(root, v).relative_to(root).as_posix() for v in variants},
        "quantization": quantization,  # the setting that ran (quantize.setting: GPTQ or its fallback)
        "source": source_record(hf_dir, final_dir),
        "opset": opset or _graph_opset(bundle.graph_path(root, variants[0])),
        "graph": graph,  # "gqa": formats/onnx/gqa.py's builder graph; "traced": decoder.py's
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, **_builder_version()},
    }
    (root / bundle.META).write_text(json.dumps(meta, indent=2) + "\n")


def source_record(hf_dir: Path, final_dir: Path) -> dict:
    """Where the weights came from, in a form that stays true after the export dir is renamed into place.

    A sibling of the export dir (the pipeline's DIR/merged beside DIR/onnx, still inside its temp dir
    while this runs) is recorded relative to the export dir; anything else as the caller gave it. The
    digests come from the source's own lorax.json when it has them (a merge hashed its shards already).
    """
    sibling = hf_dir.resolve().parent == final_dir.resolve().parent
    path = os.path.relpath(hf_dir.resolve(), final_dir.resolve()) if sibling else str(hf_dir)
    meta_path = hf_dir / bundle.META
    known = (json.loads(meta_path.read_text()).get("files") or {}) if meta_path.is_file() else {}
    weights = sorted(p.name for p in hf_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    return {"path": path, "relative_to": "this dir" if sibling else None,
            "sha256": {n: known.get(n) or sha256_file(hf_dir / n) for n in weights}}


def _builder_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"onnxruntime-genai": version("onnxruntime-genai")}
    except PackageNotFoundError:
        return {}


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
