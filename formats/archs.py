"""The one list of model architectures lorax carries through the whole chain (train, merge, GGUF, ONNX, gate).

    lorax export adapter/ --out dist/ --gguf --onnx     # a model_type missing here is refused at once

The GGUF writer's tables (formats/gguf/arch.py), the ONNX exporter (formats/onnx/layout.py), the CLI's
refusal, the README's architecture table and the tests all read this table; tests check that each format's
own tables cover exactly these keys. Pure data, no heavy imports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import FormatError


@dataclass(frozen=True)
class Arch:
    """One HF `model_type`: the class transformers builds for it and the llama.cpp architecture it becomes."""

    hf_class: str
    gguf_arch: str  # llama.cpp's general.architecture
    family: str  # the models people know it by (README)


# model_type (config.json) -> Arch. Order is the README's.
SUPPORTED: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", "llama", "Llama 2/3, Llama 3.2 1B/3B (tied embeddings, llama3 rope), SmolLM2"),
    "mistral": Arch("MistralForCausalLM", "llama", "Mistral 7B"),
    "qwen2": Arch("Qwen2ForCausalLM", "qwen2", "Qwen2, Qwen2.5"),
    "qwen3": Arch("Qwen3ForCausalLM", "qwen3", "Qwen3"),
    "smollm3": Arch("SmolLM3ForCausalLM", "smollm3", "SmolLM3 (every 4th layer without rope)"),
    "phi3": Arch("Phi3ForCausalLM", "phi3", "Phi-3/3.5-mini, Phi-4-mini (fused qkv/gate_up, longrope, partial rotary)"),
    "gemma3_text": Arch("Gemma3ForCausalLM", "gemma3", "Gemma 3 text (270M, 1B; sliding window, (1+w) norms)"),
}


def unsupported_message(model_type: Any, what: str = "lorax") -> str:
    return f"{what} does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"


def check_supported(config: Mapping[str, Any], what: str = "lorax") -> str:
    """The config's model_type, or FormatError with the one line that lists the supported ones."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise FormatError(unsupported_message(model_type, what))
    return model_type


def source_model_type(source: Path) -> str | None:
    """model_type of an HF model dir, or of an adapter's base (lorax.json, else adapter_config.json's base);
    None when neither says (the later steps then name what is missing)."""
    def read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    if (source / "config.json").is_file():
        return read(source / "config.json").get("model_type")
    base = read(source / "lorax.json").get("base") or {}
    if isinstance(base, dict) and base.get("architecture"):
        return base["architecture"]
    base_path = read(source / "adapter_config.json").get("base_model_name_or_path")
    if base_path and (Path(base_path) / "config.json").is_file():
        return read(Path(base_path) / "config.json").get("model_type")
    return None
