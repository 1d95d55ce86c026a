"""The one registry of exportable types: (format, type) -> threshold row, its basis, and how it is judged.

    lorax export adapter/ --out dist/ --gguf --quant q4_k_m     # --quant choices come from here
    lorax check adapter/ dist/model-q4_k_m.gguf                 # so do the limits and the floor/control

A type without a row here is not offered by the CLI and is refused before anything is written, with the
supported list: the gate can only promise what it can judge. Each row says where its numbers come from.

`control` names the lossless type of the same writer that must pass its own (lossless) limits before a
quantization floor may relax a lossy type's limits (exporter.gate.floor): a writer bug that hits every file it
writes (q/k rows, rope theta, norm epsilon, a swapped tensor) also inflates the floor, but it cannot hide
from a lossless file measured against the trained model.

Where the numbers come from (../shared/DESIGN.md): llama.cpp's own converter + quantizer on SmolLM2-135M
(512 tokens of English) measured f32 1.4e-5, q8_0 6.8e-3, q4_k_m 0.099 mean KLD; published Llama-3-8B
anchors (llama.cpp PR 6936) q6_K 0.0055, q5_K_M 0.011, q4_0 0.072 (a 135M model quantizes 3-5x worse).
f32/f16 limits sit above the reference's own noise floor (bnb CPU 4-bit matmul, KLD ~5.6e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import LoraxError

_F32 = {"kld_mean": 1e-4, "kld_p99": 2e-3, "top1": 0.99, "ppl_ratio": 1.01, "greedy_match": 0.75}
_F16 = {"kld_mean": 1e-3, "kld_p99": 1e-2, "top1": 0.97, "ppl_ratio": 1.02, "greedy_match": 0.5}
_BF16 = {"kld_mean": 5e-3, "kld_p99": 5e-2, "top1": 0.94, "ppl_ratio": 1.03}
_Q4_0 = {"kld_mean": 0.25, "kld_p99": 2.5, "top1": 0.75, "ppl_ratio": 1.45}

_IQ_BASIS = ("original SmolLM2-135M-Instruct vs itself, its own matrix from the demo's 300 training rows, "
             "24 held-out demo prompts (docs/QUANT.md):")
F32_BASIS = "above the 4-bit reference's own noise (KLD ~5.6e-5); llama.cpp's converter f32 on SmolLM2: 1.4e-5"
F16_BASIS = "f16 rounding of f32 weights: SmolLM2 KLD 1.05e-5 (ONNX f16), limits 100x above"
BF16_BASIS = "bf16 rounding of float32 weights: QLoRA merge of SmolLM2 in bf16, mean KLD 3.6e-3"


@dataclass(frozen=True)
class ExportType:
    """One (format, type) the gate can judge."""

    format: str  # "hf" | "gguf" | "onnx"
    name: str  # "q4_k_m", "float32", ...
    limits: dict[str, float]
    basis: str  # the measurement the row comes from
    # lossy types a quantization floor may excuse; `control` is the lossless type of the same writer that
    # must pass first (None: exact of the merged weights, i.e. not a quantization)
    quantized: bool = False
    control: str | None = None
    aliases: tuple[str, ...] = field(default=())


def _rows() -> list[ExportType]:
    g, o, h = "gguf", "onnx", "hf"
    return [
        ExportType(h, "float32", _F32, F32_BASIS),
        ExportType(h, "float16", _F16, F16_BASIS),
        ExportType(h, "bfloat16", _BF16, BF16_BASIS),
        ExportType(g, "f32", _F32, F32_BASIS),
        ExportType(g, "f16", _F16, F16_BASIS),
        ExportType(g, "bf16", _BF16, BF16_BASIS),
        ExportType(g, "q8_0", {"kld_mean": 1.5e-2, "kld_p99": 0.15, "top1": 0.92, "ppl_ratio": 1.05},
                   "llama.cpp q8_0 on SmolLM2: 6.8e-3 mean KLD (512 tokens)", True, "f32"),
        ExportType(g, "q6_k", {"kld_mean": 3e-2, "kld_p99": 0.3, "top1": 0.90, "ppl_ratio": 1.08},
                   "Llama-3-8B q6_K 0.0055 (PR 6936) x ~5 for a 135M model", True, "f32"),
        ExportType(g, "q5_k_m", {"kld_mean": 6e-2, "kld_p99": 0.6, "top1": 0.87, "ppl_ratio": 1.12},
                   "Llama-3-8B q5_K_M 0.011 (PR 6936) x ~5 for a 135M model", True, "f32"),
        ExportType(g, "q4_k_m", {"kld_mean": 0.15, "kld_p99": 1.5, "top1": 0.80, "ppl_ratio": 1.30},
                   "llama.cpp q4_k_m on SmolLM2: 0.099 (DESIGN) / 0.054 (session 1) mean KLD", True, "f32"),
        ExportType(g, "q4_0", _Q4_0, "Llama-3-8B q4_0 0.072 (PR 6936) x ~3.5 for a 135M model", True, "f32"),
        # i-quants, always with an importance matrix; limits ~2.2x the mean KLD (and ~3x the p99) the type
        # costs the original SmolLM2-135M-Instruct with its own matrix, as q4_k_m's row is to its 0.069
        ExportType(g, "iq4_xs", {"kld_mean": 0.3, "kld_p99": 3.5, "top1": 0.76, "ppl_ratio": 1.30},
                   f"{_IQ_BASIS} iq4_xs 0.136 mean KLD, p99 1.21, top-1 0.863", True, "f32"),
        ExportType(g, "iq3_m", {"kld_mean": 0.4, "kld_p99": 6.5, "top1": 0.71, "ppl_ratio": 1.35},
                   f"{_IQ_BASIS} iq3_m 0.184 mean KLD, p99 2.25, top-1 0.811", True, "f32"),
        ExportType(g, "iq3_xxs", {"kld_mean": 0.7, "kld_p99": 13.0, "top1": 0.69, "ppl_ratio": 1.35},
                   f"{_IQ_BASIS} iq3_xxs 0.328 mean KLD, p99 4.48, top-1 0.790", True, "f32"),
        ExportType(g, "iq2_m", {"kld_mean": 1.0, "kld_p99": 13.5, "top1": 0.64, "ppl_ratio": 1.40},
                   f"{_IQ_BASIS} iq2_m 0.470 mean KLD, p99 4.56, top-1 0.745", True, "f32"),
        ExportType(o, "float32", {**_F32, "max_abs_logit": 1e-3}, "ONNX f32 export of SmolLM2: max |dlogit| 1.1e-4"),
        ExportType(o, "float16", _F16, F16_BASIS),
        ExportType(o, "int8", {"kld_mean": 0.1, "kld_p99": 1.0, "top1": 0.85, "ppl_ratio": 1.2},
                   "8-bit MatMulNBits on SmolLM2: KLD 0.0073-0.0076, top-1 0.959-0.969", True, "float32"),
        # int4 is one scale + integer zero point per 16 weights with the sensitive projections at 8 bits
        # (formats/onnx/quantize.py): between q4_0's class and q4_k_m's, so q4_0's row
        ExportType(o, "int4", _Q4_0, "q4_0's class; the demo's QLoRA merge, lorax's weighted int4 (b16, v/down/gate "
                   "8-bit) vs the trained model: KLD 0.116, p99 0.945, top-1 0.916 (16 held-out rows)", True, "float32"),
    ]


TYPES: dict[tuple[str, str], ExportType] = {(t.format, t.name): t for t in _rows()}


def offered(fmt: str) -> list[str]:
    """The types of `fmt` the CLI offers (every one has a row)."""
    return [name for (f, name) in TYPES if f == fmt]


def lookup(fmt: str, name: str) -> ExportType:
    """The row for (fmt, name), or one line naming the supported types."""
    key = (fmt, name.strip().lower())
    if key not in TYPES:
        raise LoraxError(f"{fmt} type {name!r} cannot be gated (no threshold row); supported: "
                         f"{', '.join(offered(fmt))}")
    return TYPES[key]


def recipe_key(fmt: str, qtype: str) -> str:
    """Where a type's recipe sits in the gate's recipes: GGUF types by name, other formats' as FORMAT:TYPE."""
    return qtype if fmt == "gguf" else f"{fmt}:{qtype}"


def normalise_quants(quants: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """--quant values checked against the registry before anything is written (order kept, no duplicates)."""
    out: list[str] = []
    for q in quants:
        name = lookup("gguf", q).name
        if name not in out:
            out.append(name)
    return tuple(out)


def _build_gguf(hf_dir: Path, dtype: str, work: Path, stem: str, recipe=None) -> Path:
    from formats.gguf.export import GGUFOptions, export_gguf

    opts = GGUFOptions(stem=stem, force=True, check_tokenizer=False, progress=False, digests=False,
                       recipes={dtype: recipe} if recipe is not None else {})
    return export_gguf(hf_dir, work / f"{stem}-gguf", [dtype], opts).files[0].path


def _build_onnx(hf_dir: Path, dtype: str, work: Path, stem: str, recipe=None) -> Path:
    from formats.gguf.imatrix import hf_importance
    from formats.onnx.export import export_onnx

    kw = {"quant": dtype} if dtype in ("int8", "int4") else {"dtype": dtype}
    if recipe is not None and recipe.imatrix is not None:  # the target's weighting (the floor's file too)
        kw["importance"] = hf_importance(recipe.imatrix, hf_dir)
    if recipe is not None and recipe.calibration:  # GPTQ's rows: each model calibrates on its own inputs
        kw["calibration"] = recipe.calibration
    return export_onnx(hf_dir, work / f"{stem}-onnx-{dtype}", force=True, **kw).dir


# format -> the writer that makes a file of a type from an HF dir (the floor's and the control's files are
# made by the same code as the shipped ones)
BUILDERS: dict[str, Callable[..., Path]] = {"gguf": _build_gguf, "onnx": _build_onnx}


def build(fmt: str, hf_dir: Path, dtype: str, work: Path, stem: str, recipe=None) -> Path:
    """A file of (fmt, dtype) from `hf_dir`; `recipe` (GGUF: importance matrix, tensor types) as the target's."""
    return BUILDERS[fmt](Path(hf_dir), dtype, Path(work), stem, recipe)
