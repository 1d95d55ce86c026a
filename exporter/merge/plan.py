"""The merge plan (`lorax merge ADAPTER --out DIR`, step 1 of 2): which base tensor gets which LoRA terms.

    plan = build_plan(info, adapter_tensors, base_tensors, layout, "quantized")   # pure: refuses or plans
    exporter.merge.stream.write_weights(plan, ...)                                # step 2: execute it

A QLoRA adapter was trained on top of dequant(NF4(W)), not on W: folding it into W ships a model that
differs from the trained one (SmolLM2: mean KLD 0.46 for the base alone, ../shared/DESIGN.md). So the plan
marks every weight bitsandbytes quantized in training for a bit-exact 4-bit round trip before the adapter
is added in float32: W' = deq(q(W)) + scale * B @ A. Planning reads no base weights (only names, shapes,
dtypes), so every refusal happens before anything is written, as mergekit plans before it executes.
The entry point, `merge_adapter`, lives in exporter.merge.api.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.errors import LoraxError
from exporter.gate.reference import AdapterInfo, BaseLayout
from lorax_common.record import MERGE_BASES

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\."
                      r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<param>weight|bias))?$")


# ---- pure math -------------------------------------------------------------------------------------

def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def fold(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool = False) -> torch.Tensor:
    """w += scale * (B @ A), or its transpose (embeddings, fan_in_fan_out); in place, float32, returns w.

    For a row chunk of w pass the matching rows: b[rows] (plain), or a[:, rows] (transposed).
    """
    if transpose:
        return w.addmm_(a.t(), b.t(), alpha=scale)
    return w.addmm_(b, a, alpha=scale)


# ---- the plan: which base tensor gets what -----------------------------------------------------------

@dataclass
class LoraTerm:
    module: str
    a: torch.Tensor  # [r, in] (embedding: [r, num_embeddings])
    b: torch.Tensor  # [out, r] (embedding: [dim, r])
    scale: float
    transpose: bool


@dataclass
class Job:
    """One output tensor: where its values come from and what is added to them."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # source dtype
    source: tuple[Path, str] | None = None  # base tensor to stream
    replacement: torch.Tensor | None = None  # full tensor from the adapter (modules_to_save, base_layer)
    quantized: bool = False  # round-trip through 4 bits first, as training saw it
    terms: list[LoraTerm] = field(default_factory=list)
    bias_adds: list[tuple[torch.Tensor, float]] = field(default_factory=list)  # lora_B.bias * scale


@dataclass
class Plan:
    jobs: list[Job]
    untied: bool  # tied embeddings got separate output embeddings because the adapter changes one side
    counts: dict[str, int]


def _shape_error(module: str, expected: tuple, got: tuple, base_dir: Path) -> LoraxError:
    return LoraxError(f"adapter/base shape mismatch at {module}: the adapter needs {list(expected)} but "
                      f"{base_dir} has {list(got)}; the adapter was trained on another base (pass the right --base)")


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(list(pattern), module), default) if pattern else default


def build_plan(info: AdapterInfo, adapter: dict[str, torch.Tensor], base: list, layout: BaseLayout,
               merge_base: str) -> Plan:
    """Match adapter tensors to base tensors; refuse (one line) anything that does not fit."""
    cfg = info.peft_config
    loras: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"lora_A", "lora_B", "lora_B_bias"}
    embedding_modules: set[str] = set()
    replacements: dict[str, torch.Tensor] = {}
    for key, t in adapter.items():
        m = LORA_KEY.match(key)
        if m:
            part = m["part"].replace("lora_embedding_", "lora_")
            loras.setdefault(m["module"], {})[part + ("_bias" if m["param"] == "bias" else "")] = t
            if "embedding" in m["part"]:
                embedding_modules.add(m["module"])
        elif "lora_" in key:
            raise LoraxError(f"adapter tensor {key} is not plain LoRA (e.g. DoRA magnitude); lorax merge cannot fold it")
        else:
            name = key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            replacements[name.replace(".base_layer.", ".")] = t

    tie_src = layout.input_embeddings if layout.tied else None
    touched = set(replacements) | {f"{mod}.weight" for mod in loras}
    untie = bool(layout.tied and {layout.input_embeddings, layout.output_embeddings} & touched)
    jobs = {key: Job(key, shape, dtype, source=(path, key)) for path, key, shape, dtype in base}
    out_key = layout.output_embeddings
    if untie and out_key not in jobs and tie_src in jobs:
        src = jobs[tie_src]  # the tied output embedding was never stored: it starts as the input's values
        jobs[out_key] = Job(out_key, src.shape, src.dtype, source=src.source,
                            replacement=replacements.get(tie_src))

    for name, t in replacements.items():
        if name not in jobs:
            raise LoraxError(f"adapter tensor {name} has no counterpart in the base {info.base_dir}; "
                             "the adapter was trained on another base (pass the right --base)")
        if tuple(t.shape) != jobs[name].shape:
            raise _shape_error(name, tuple(t.shape), jobs[name].shape, info.base_dir)
        jobs[name].replacement = t

    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    for module, parts in sorted(loras.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            raise LoraxError(f"adapter module {module} lacks lora_A or lora_B; the adapter file is incomplete")
        a, b, emb = parts["lora_A"], parts["lora_B"], module in embedding_modules
        job = jobs.get(f"{module}.weight")
        if job is None:
            raise LoraxError(f"target module {module} is missing in the base {info.base_dir}; the adapter "
                             "was trained on another model (pass the right --base)")
        r = a.shape[0]
        if b.shape[1] != r:
            raise LoraxError(f"adapter module {module}: lora_A has rank {r} but lora_B rank {b.shape[1]}")
        transpose = emb or fan_in_fan_out
        need = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if job.shape != need:
            raise _shape_error(module, need, job.shape, info.base_dir)
        r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", r))
        if r_cfg != r:
            raise LoraxError(f"adapter module {module} has rank {r} but adapter_config.json says {r_cfg}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        scale = lora_scale(alpha, r, bool(cfg.get("use_rslora")))
        job.terms.append(LoraTerm(module, a.float(), b.float(), scale, transpose))
        if "lora_B_bias" in parts:
            bias = jobs.get(f"{module}.bias")
            if bias is None:
                raise LoraxError(f"adapter module {module} has a LoRA bias but the base layer has no bias")
            bias.bias_adds.append((parts["lora_B_bias"].float(), scale))

    quantized = 0
    if merge_base == "quantized":
        missing = sorted(layout.quantized - set(jobs))
        if missing:
            raise LoraxError(f"base {info.base_dir} lacks {missing[0]} (and {len(missing) - 1} more) that "
                             "training quantized; its checkpoint keys do not match the model's modules")
        for key in layout.quantized:
            if jobs[key].replacement is None:
                jobs[key].quantized = True
                quantized += 1
    for job in jobs.values():
        if (job.terms or job.quantized) and not job.dtype.is_floating_point:
            raise LoraxError(f"base tensor {job.name} is {job.dtype}, not floating point; cannot fold into it")
    counts = {"tensors": len(jobs), "quantized": quantized, "lora_modules": len(loras),
              "replaced": len(replacements)}
    return Plan(list(jobs.values()), untie, counts)


def resolve_merge_base(requested: str | None, info: AdapterInfo) -> str:
    """Default: the base as trained. `quantized` means nothing for an adapter trained without 4-bit."""
    if requested is None:
        return "quantized" if info.trained_on.quantized else "original"
    if requested not in MERGE_BASES:
        raise LoraxError(f"--merge-base {requested!r} is not one of {', '.join(MERGE_BASES)}")
    if not info.trained_on.quantized and requested == "quantized":
        raise LoraxError(f"{info.adapter_dir} was trained on an unquantized base, so --merge-base quantized "
                         "does not apply; drop the flag (original is exact here)")
    if not info.trained_on.quantized and requested == "auto":
        info.notes.append("--merge-base auto on an adapter trained without 4-bit: both bases are the original")
        return "original"
    return requested


def default_dtype(info: AdapterInfo) -> str:
    """The dtype training computed in: a QLoRA step runs dequant(NF4(W)) + B@A in the compute dtype, so only
    that dtype holds the trained model exactly (SmolLM2 QLoRA, a bf16 merge of a float32-computed run: mean
    KLD 3.6e-3, p99 0.056 against the trained model). Smaller storage is opt-in with --dtype, and gated."""
    t = info.trained_on
    return t.compute_dtype if t.quantized else t.load_dtype
