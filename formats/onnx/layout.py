"""The decoder graph's contract: which architectures export, and optimum's I/O names and shapes.

    lorax export adapter/ --out dist/ --onnx    # writes dist/onnx/model.onnx in this layout

optimum's `ORTModelForCausalLM` (and onnxruntime-genai, transformers.js, ...) find the KV cache by
these names, so the exporter writes them and the runner reads them from here. Pure data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from formats.archs import SUPPORTED, unsupported_message
from formats.errors import FormatError

# model_type -> the HF class the exporter traces: every architecture lorax carries (formats/archs.py). Each
# has a decoder whose cache is one K and one V tensor per layer (sliding-window layers included: the graph
# keeps their whole cache and applies the window in the mask), which maps 1:1 onto optimum's per-layer
# key/value names; each is covered by a parity test on a tiny random model (tests/test_onnx_export.py).
SUPPORTED_ARCHS: dict[str, str] = {model_type: a.hf_class for model_type, a in SUPPORTED.items()}

# Graph inputs besides the cache, in the order optimum's exports have them.
INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"

# Names of the symbolic dimensions written into the graph (what `onnx` shows for each axis).
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def input_names(n_layers: int) -> list[str]:
    return [*INPUTS, *past_names(n_layers)]


def output_names(n_layers: int) -> list[str]:
    return [LOGITS, *present_names(n_layers)]


@dataclass(frozen=True)
class CacheGeometry:
    """Per-layer cache tensors are [batch, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int

    def shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, length, self.head_dim)


def check_arch(config: dict) -> str:
    """Return the config's model_type, or raise the one-line error that lists what is supported."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise FormatError(unsupported_message(model_type, "ONNX export"))
    return model_type


def cache_geometry(config: dict) -> CacheGeometry:
    """KV-cache shape from a config.json dict (head_dim is explicit in Qwen3 and may differ from hidden/heads)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return CacheGeometry(config["num_hidden_layers"], config.get("num_key_value_heads") or heads, head_dim)
