"""A PEFT LoRA adapter alone as a llama.cpp LoRA GGUF (`llama-cli --lora`, `Llama(lora_path=...)`).

    lorax export ADAPTER --out dist --gguf --gguf-adapter

The file holds `<gguf tensor>.lora_a` ([r, in], as PEFT stores A) and `.lora_b` ([out, r]) for each adapted
linear layer, plus `adapter.lora.alpha`; llama.cpp adds (alpha / r) * B @ A to the base weight at run time.
The base GGUF and the adapter must agree on row order, so B of q/k is permuted like the base q/k weights.
Anything llama.cpp cannot apply as a low-rank delta is refused with the fix: merge instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, Keys

from formats.errors import FormatError
from formats.gguf import arch as archmod
from formats.gguf.writer import TensorPlan, read_config, write_streamed
from lorax_common.files import read_json_object, safetensors_header

PREFIX = "base_model.model."
# adapter tensor suffix -> GGUF suffix
PARTS = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"}
MERGE_INSTEAD = "export the merged model instead (drop --gguf-adapter)"


def check_adapter_config(acfg: dict[str, Any]) -> None:
    """Refuse adapters whose effect is not a plain per-layer B @ A delta with one alpha."""
    problems = {
        "peft_type": acfg.get("peft_type", "LORA") != "LORA",
        "modules_to_save": bool(acfg.get("modules_to_save")),
        "use_dora": bool(acfg.get("use_dora")),
        "rank_pattern": bool(acfg.get("rank_pattern")),
        "alpha_pattern": bool(acfg.get("alpha_pattern")),
        "bias": acfg.get("bias", "none") != "none",
        "fan_in_fan_out": bool(acfg.get("fan_in_fan_out")),
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        detail = ", ".join(f"{k}={acfg.get(k)!r}" for k in bad)
        raise FormatError(f"llama.cpp LoRA adapters cannot carry {detail}; {MERGE_INSTEAD}")


def gguf_alpha(acfg: dict[str, Any]) -> float:
    """llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r), i.e. alpha' = alpha * sqrt(r)."""
    alpha = float(acfg["lora_alpha"])
    return alpha * math.sqrt(acfg["r"]) if acfg.get("use_rslora") else alpha


def plan_adapter(adapter_file: Path, spec: archmod.ArchSpec, hp: archmod.HParams) -> list[TensorPlan]:
    from safetensors import safe_open

    plans: list[tuple[tuple, TensorPlan]] = []
    with safe_open(adapter_file, "pt") as f:
        for key in f.keys():
            part = next((p for p in PARTS if key.endswith(p)), None)
            if part is None or not key.startswith(PREFIX):
                raise FormatError(f"adapter tensor {key!r} is not a LoRA A/B matrix of a linear layer "
                                  f"(embedding LoRA and extra parameters are not supported); {MERGE_INSTEAD}")
            hf_name = key[len(PREFIX):-len(part)] + ".weight"
            mapped = archmod.gguf_tensor_name(spec, hf_name)
            if mapped is None:
                raise FormatError(f"adapter tensor {key!r} targets {hf_name}, which the GGUF does not contain")
            name, kind, bid = mapped
            if kind == archmod.T.OUTPUT and hp.tied:
                raise FormatError(f"the adapter trains lm_head but the model ties it to the embeddings, so the "
                                  f"base GGUF has no output tensor to adapt; {MERGE_INSTEAD}")
            suffix = PARTS[part]
            heads = None
            if suffix == "lora_b" and spec.permute_qk and kind in archmod.QK_ROWS:
                heads = hp.n_head_kv if archmod.QK_ROWS[kind] else hp.n_head
            shape = tuple(f.get_slice(key).get_shape())
            plan = TensorPlan(f"{name}.{suffix}", shape, GGMLQuantizationType.F32, adapter_file, key, heads)
            plans.append(((bid if bid is not None else -1, name, suffix), plan))
    if not plans:
        raise FormatError(f"{adapter_file}: no LoRA tensors found")
    return [p for _, p in sorted(plans, key=lambda x: x[0])]


def write_lora_gguf(adapter_dir: str | Path, base_dir: str | Path, out_path: str | Path, *,
                    force: bool = False, progress: bool = True) -> Path:
    """Write the adapter in `adapter_dir` as a LoRA GGUF for the model whose config is in `base_dir`."""
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FormatError(f"{adapter_dir}: not a PEFT adapter (needs adapter_config.json and "
                          "adapter_model.safetensors)")
    acfg = read_json_object(cfg_path, "a PEFT adapter config")
    safetensors_header(weights)
    check_adapter_config(acfg)
    cfg = read_config(Path(base_dir))
    spec, hp = archmod.arch_spec(cfg), archmod.hparams(cfg)
    plans = plan_adapter(weights, spec, hp)

    w = GGUFWriter(path=None, arch=spec.name)
    w.add_type("adapter")
    w.add_name(adapter_dir.name)
    w.add_key_value(Keys.Adapter.TYPE, "lora", GGUFValueType.STRING)
    w.add_key_value(Keys.Adapter.LORA_ALPHA, gguf_alpha(acfg), GGUFValueType.FLOAT32)
    write_streamed(w, plans, out_path, force=force, desc="gguf lora", progress=progress)
    return out_path
