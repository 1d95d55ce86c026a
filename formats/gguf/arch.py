"""Architecture knowledge for the GGUF writer, as tables: HF tensor names -> GGUF tensor names, config -> metadata.

    lorax export ADAPTER --out dist --gguf          (formats.gguf.writer reads these tables)

Tensor names come from gguf-py's `TENSOR_NAMES` (e.g. MODEL_TENSOR.ATTN_Q -> "blk.{bid}.attn_q"); this
module only says which HF name feeds which GGUF tensor for each supported architecture. Metadata keys are
gguf-py's `Keys.LLM.*` templates. Facts about what llama.cpp expects (q/k row order, the llama3 rope
factor tensor, `[PAD{i}]` tokens) follow llama.cpp's file format; no code is taken from its converter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, TENSOR_NAMES, GGUFValueType, Keys, RopeScalingType
from gguf import MODEL_TENSOR as T

from formats.errors import FormatError

# HF name (with {bid} for the block index) -> (GGUF tensor, suffix). One table per family, merged below.
_BASE: dict[str, tuple[T, str]] = {
    "model.embed_tokens.weight": (T.TOKEN_EMBD, "weight"),
    "model.norm.weight": (T.OUTPUT_NORM, "weight"),
    "lm_head.weight": (T.OUTPUT, "weight"),
    "model.layers.{bid}.input_layernorm.weight": (T.ATTN_NORM, "weight"),
    "model.layers.{bid}.self_attn.q_proj.weight": (T.ATTN_Q, "weight"),
    "model.layers.{bid}.self_attn.k_proj.weight": (T.ATTN_K, "weight"),
    "model.layers.{bid}.self_attn.v_proj.weight": (T.ATTN_V, "weight"),
    "model.layers.{bid}.self_attn.o_proj.weight": (T.ATTN_OUT, "weight"),
    "model.layers.{bid}.post_attention_layernorm.weight": (T.FFN_NORM, "weight"),
    "model.layers.{bid}.mlp.gate_proj.weight": (T.FFN_GATE, "weight"),
    "model.layers.{bid}.mlp.up_proj.weight": (T.FFN_UP, "weight"),
    "model.layers.{bid}.mlp.down_proj.weight": (T.FFN_DOWN, "weight"),
}
# attention biases: Qwen2 always has q/k/v biases; Llama with attention_bias=True has all four
_ATTN_BIAS: dict[str, tuple[T, str]] = {
    "model.layers.{bid}.self_attn.q_proj.bias": (T.ATTN_Q, "bias"),
    "model.layers.{bid}.self_attn.k_proj.bias": (T.ATTN_K, "bias"),
    "model.layers.{bid}.self_attn.v_proj.bias": (T.ATTN_V, "bias"),
    "model.layers.{bid}.self_attn.o_proj.bias": (T.ATTN_OUT, "bias"),
}
_QK_NORM: dict[str, tuple[T, str]] = {
    "model.layers.{bid}.self_attn.q_norm.weight": (T.ATTN_Q_NORM, "weight"),
    "model.layers.{bid}.self_attn.k_norm.weight": (T.ATTN_K_NORM, "weight"),
}
# tensors some checkpoints carry that the model recomputes (old Llama exports saved rope inv_freq)
SKIP = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)

# q/k projections whose rows llama.cpp wants interleaved (see permute_qk); the bool says "k" (kv heads)
QK_ROWS = {T.ATTN_Q: False, T.ATTN_K: True}


@dataclass(frozen=True)
class ArchSpec:
    """How one HF `model_type` maps onto a llama.cpp architecture."""

    arch: MODEL_ARCH
    tensors: Mapping[str, tuple[T, str]]
    # llama.cpp's "llama" graph applies rope to adjacent pairs (x0,x1),(x2,x3)...; HF Llama/Mistral rotate
    # halves (x_i, x_{i+d/2}). Reordering q/k rows per head makes the two agree. Qwen2/3 use llama.cpp's NEOX
    # rope, which is HF's rotate-half already, so their rows stay as they are.
    permute_qk: bool

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(MODEL_ARCH.LLAMA, {**_BASE, **_ATTN_BIAS}, permute_qk=True),
    "mistral": ArchSpec(MODEL_ARCH.LLAMA, _BASE, permute_qk=True),
    "qwen2": ArchSpec(MODEL_ARCH.QWEN2, {**_BASE, **_ATTN_BIAS}, permute_qk=False),
    "qwen3": ArchSpec(MODEL_ARCH.QWEN3, {**_BASE, **_QK_NORM}, permute_qk=False),
}


def caveats(cfg: Mapping[str, Any]) -> list[str]:
    """Config features the GGUF cannot carry but which only matter past some length (reported, not fatal)."""
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < cfg.get("max_position_embeddings", 0):
        return [f"sliding_window={window}: llama.cpp attends to the whole context for this architecture, so "
                f"outputs differ from transformers on sequences longer than {window} tokens"]
    return []


def arch_spec(cfg: Mapping[str, Any]) -> ArchSpec:
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        raise FormatError(
            f"model_type {model_type!r} is not supported by the GGUF writer; supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def gguf_tensor_name(spec: ArchSpec, hf_name: str) -> tuple[str, T, int | None] | None:
    """(GGUF name, tensor kind, block index) for an HF tensor, None for tensors to skip; FormatError if unknown."""
    m = _BLOCK.match(hf_name)
    bid = int(m.group(1)) if m else None
    key = _BLOCK.sub("model.layers.{bid}.", hf_name) if m else hf_name
    if key in SKIP:
        return None
    if key not in spec.tensors:
        raise FormatError(f"tensor {hf_name!r} has no GGUF name for architecture {spec.name}; "
                          "is this a plain causal LM checkpoint (no extra heads or adapters)?")
    kind, suffix = spec.tensors[key]
    return f"{TENSOR_NAMES[kind].format(bid=bid)}.{suffix}", kind, bid


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved order, per head (works on weights, biases, LoRA B)."""
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk` (used by tests to prove the permutation matters)."""
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- hparams


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope: Mapping[str, Any]  # rope_type, rope_theta, factor, ...
    tied: bool
    vocab_size: int


def hparams(cfg: Mapping[str, Any]) -> HParams:
    n_head = cfg["num_attention_heads"]
    # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling` (with "type" or "rope_type")
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        legacy = dict(cfg.get("rope_scaling") or {})
        rope = {"rope_theta": cfg.get("rope_theta", 10000.0), **legacy}
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return HParams(
        n_layer=cfg["num_hidden_layers"],
        n_embd=cfg["hidden_size"],
        n_ff=cfg["intermediate_size"],
        n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        n_ctx=cfg.get("max_position_embeddings", 2048),
        rms_eps=cfg.get("rms_norm_eps", 1e-6),
        rope=rope,
        tied=bool(cfg.get("tie_word_embeddings", False)),
        vocab_size=cfg["vocab_size"],
    )


# (key template, hparams field or callable, value type): the model metadata every supported arch carries
_META: tuple[tuple[str, Any, GGUFValueType], ...] = (
    (Keys.LLM.CONTEXT_LENGTH, "n_ctx", GGUFValueType.UINT32),
    (Keys.LLM.EMBEDDING_LENGTH, "n_embd", GGUFValueType.UINT32),
    (Keys.LLM.BLOCK_COUNT, "n_layer", GGUFValueType.UINT32),
    (Keys.LLM.FEED_FORWARD_LENGTH, "n_ff", GGUFValueType.UINT32),
    (Keys.LLM.VOCAB_SIZE, "vocab_size", GGUFValueType.UINT32),
    (Keys.Attention.HEAD_COUNT, "n_head", GGUFValueType.UINT32),
    (Keys.Attention.HEAD_COUNT_KV, "n_head_kv", GGUFValueType.UINT32),
    (Keys.Attention.KEY_LENGTH, "head_dim", GGUFValueType.UINT32),
    (Keys.Attention.VALUE_LENGTH, "head_dim", GGUFValueType.UINT32),
    (Keys.Attention.LAYERNORM_RMS_EPS, "rms_eps", GGUFValueType.FLOAT32),
    (Keys.Rope.DIMENSION_COUNT, "head_dim", GGUFValueType.UINT32),
    (Keys.Rope.FREQ_BASE, lambda hp: hp.rope["rope_theta"], GGUFValueType.FLOAT32),
)


def llama3_rope_factors(rope: Mapping[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.x rope scaling (Meta's published formula), as llama.cpp's rope_freqs."""
    base = rope["rope_theta"]
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def _rope_none(rope, hp):
    return [], {}


def _rope_linear(rope, hp):
    return [(Keys.Rope.SCALING_TYPE, RopeScalingType.LINEAR.value, GGUFValueType.STRING),
            (Keys.Rope.SCALING_FACTOR, float(rope["factor"]), GGUFValueType.FLOAT32)], {}


def _rope_llama3(rope, hp):
    # llama.cpp reads Llama 3 scaling from a tensor of per-frequency factors, not from metadata
    return [], {f"{TENSOR_NAMES[T.ROPE_FREQS]}.weight": llama3_rope_factors(rope, hp.head_dim)}


# rope_type -> handler(rope params, hparams) -> (metadata items, extra F32 tensors)
ROPE_SCALING = {"default": _rope_none, "linear": _rope_linear, "llama3": _rope_llama3}


def model_metadata(spec: ArchSpec, hp: HParams) -> tuple[list[tuple[str, Any, GGUFValueType]], dict[str, np.ndarray]]:
    """Arch metadata (key, value, type) and extra tensors (rope factors) for one model."""
    rope_type = hp.rope["rope_type"]
    if rope_type not in ROPE_SCALING:
        raise FormatError(f"rope scaling {rope_type!r} is not supported by the GGUF writer; "
                          f"supported: {', '.join(ROPE_SCALING)}")
    items = [(key.format(arch=spec.name), field(hp) if callable(field) else getattr(hp, field), vtype)
             for key, field, vtype in _META]
    rope_items, extra = ROPE_SCALING[rope_type](hp.rope, hp)
    items += [(key.format(arch=spec.name), value, vtype) for key, value, vtype in rope_items]
    return items, extra
