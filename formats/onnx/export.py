"""Export a merged HF causal LM to an ONNX decoder with KV cache, in optimum's layout.

    lorax export adapter/ --out dist/ --onnx [--onnx-dtype float16 | --onnx-quant int8|int4]
    # -> dist/onnx/model.onnx (+ model.onnx.data past 2 GB), config.json, tokenizer files, lorax.json

    from formats.onnx.export import export_onnx
    export_onnx("merged/", "dist/onnx", dtype="float32", quant=None)

optimum's own exporter cannot share an environment with transformers 5 (../shared/DESIGN.md), so
this traces the model with PyTorch's exporter (`torch.onnx.export(dynamo=True)`) through a thin
wrapper whose flat inputs/outputs carry optimum's names. The result is one graph that serves both
prefill (past length 0) and decode, with dynamic batch, sequence and past lengths, in standard ONNX
ops (opset 20), so optimum's `ORTModelForCausalLM` and other runtimes load it without lorax.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from formats.errors import FormatError
from formats.fsutil import atomic_dir, sha256_file
from formats.hf_compat import patch_dir
from formats.onnx import layout
from formats.onnx.quantize import DESCRIPTIONS, QUANTIZERS, quantize

MODEL_FILE = "model.onnx"
DTYPES = ("float32", "float16")

# Files copied from the HF dir so the ONNX dir loads on its own (optimum reads config.json and
# generation_config.json beside model.onnx; the tokenizer and chat template make it a usable model).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "vocab.json", "merges.txt",
)


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote (paths are final, under `dir`)."""

    dir: Path
    model: Path
    dtype: str
    quant: str | None
    bytes: int
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256


def export_onnx(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32", quant: str | None = None,
                force: bool = False, opset: int | None = None, external_data: bool | None = None) -> OnnxExport:
    """Write `out_dir`/model.onnx and its side files from the HF model in `hf_dir`, atomically.

    `out_dir` is the folder that will hold model.onnx (the pipeline passes DIR/onnx). Weights go to
    model.onnx.data when the model is past protobuf's 2 GB limit (`external_data=None`) or as asked.
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

    from tqdm import tqdm

    from formats.onnx.decoder import trace_decoder

    stages = ["trace"] + (["quantize"] if quant else []) + ["side files"]
    with atomic_dir(out_dir, force=force) as tmp, tqdm(total=len(stages), desc="onnx export", unit="step") as bar:
        traced = tmp / ".trace" / MODEL_FILE if quant else tmp / MODEL_FILE
        bar.set_postfix_str(f"tracing {config['model_type']} ({dtype})")
        trace_decoder(hf_dir, traced, dtype=dtype, opset=opset, external_data=external_data)
        bar.update()
        if quant:
            bar.set_postfix_str(f"quantizing ({quant})")
            quantize(traced, tmp / MODEL_FILE, quant, external_data=external_data)
            shutil.rmtree(traced.parent)
            bar.update()
        bar.set_postfix_str("config + tokenizer")
        write_side_files(hf_dir, tmp, dtype=dtype, quant=quant, opset=opset)
        bar.update()
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(MODEL_FILE))
    return OnnxExport(out_dir, out_dir / MODEL_FILE, dtype, quant, size, files)


def _read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FormatError(f"{hf_dir}: no config.json; pass a merged HF model dir (lorax merge writes one)")
    return json.loads(path.read_text())


def write_side_files(hf_dir: Path, onnx_dir: Path, dtype: str, quant: str | None, opset: int | None) -> None:
    """Config, generation config, tokenizer and chat template beside model.onnx, readable by transformers 4.x."""
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, onnx_dir / name)
    cfg = json.loads((onnx_dir / "config.json").read_text())
    cfg["use_cache"] = True  # optimum only feeds the cache when the config says so
    (onnx_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    patch_dir(onnx_dir)
    import onnx
    import torch

    meta = {
        "kind": "onnx", "dtype": dtype, "quant": quant, "quantization": DESCRIPTIONS.get(quant or ""),
        "source": str(hf_dir.resolve()),
        "opset": opset or _graph_opset(onnx_dir / MODEL_FILE),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    (onnx_dir / "lorax.json").write_text(json.dumps(meta, indent=2) + "\n")


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
