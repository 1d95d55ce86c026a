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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, TENSOR_NAMES, GGUFValueType, Keys, RopeScalingType
from gguf import MODEL_TENSOR as T

from formats.archs import check_supported
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

# Phi-3: one fused q|k|v projection and one fused gate|up projection; llama.cpp's phi3 loads them fused
# (attn_qkv; ffn_up with 2*n_ff rows, gate first, as HF's chunk(2) splits it), so they map 1:1.
_PHI3: dict[str, tuple[T, str]] = {
    **{k: v for k, v in _BASE.items() if v[0] not in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.FFN_GATE, T.FFN_UP)},
    "model.layers.{bid}.self_attn.qkv_proj.weight": (T.ATTN_QKV, "weight"),
    "model.layers.{bid}.mlp.gate_up_proj.weight": (T.FFN_UP, "weight"),
}
# Gemma 3: a norm before and after both attention and MLP ("post_attention_layernorm" is the norm *after*
# attention here, not the MLP's input norm as in Llama), plus q/k norms.
_GEMMA3: dict[str, tuple[T, str]] = {
    **_BASE, **_QK_NORM,
    "model.layers.{bid}.post_attention_layernorm.weight": (T.ATTN_POST_NORM, "weight"),
    "model.layers.{bid}.pre_feedforward_layernorm.weight": (T.FFN_PRE_NORM, "weight"),
    "model.layers.{bid}.post_feedforward_layernorm.weight": (T.FFN_POST_NORM, "weight"),
}
_NORMS = frozenset({T.ATTN_NORM, T.ATTN_POST_NORM, T.FFN_NORM, T.FFN_PRE_NORM, T.FFN_POST_NORM, T.ATTN_Q_NORM,
                    T.ATTN_K_NORM, T.OUTPUT_NORM})

# tensors some checkpoints carry that the model recomputes (old Llama exports saved rope inv_freq)
SKIP = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)

# q/k projections whose rows llama.cpp wants interleaved (see permute_qk); the bool says "k" (kv heads)
QK_ROWS = {T.ATTN_Q: False, T.ATTN_K: True}

Item = tuple[str, Any, GGUFValueType]


@dataclass(frozen=True)
class ArchSpec:
    """How one HF `model_type` maps onto a llama.cpp architecture: tables, plus the few hooks it needs."""

    arch: MODEL_ARCH
    tensors: Mapping[str, tuple[T, str]]
    # llama.cpp's "llama" graph applies rope to adjacent pairs (x0,x1),(x2,x3)...; HF Llama/Mistral rotate
    # halves (x_i, x_{i+d/2}). Reordering q/k rows per head makes the two agree. Qwen2/3, Phi-3 and Gemma 3
    # use llama.cpp's NEOX rope, which is HF's rotate-half already, so their rows stay as they are.
    permute_qk: bool
    # tensor kinds stored as (value + shift): Gemma's RMSNorm computes x * (1 + w), llama.cpp's x * w
    norm_shift: tuple[frozenset[T], float] = (frozenset(), 0.0)
    # (config, hparams) -> arch-specific metadata items; may raise FormatError for configs the GGUF cannot hold
    extra_meta: Callable[[Mapping[str, Any], HParams], list[Item]] | None = None
    # whether llama.cpp's graph for this arch applies the config's sliding window (see caveats)
    applies_sliding_window: bool = False

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]

    def shift(self, kind: T) -> float:
        kinds, value = self.norm_shift
        return value if kind in kinds else 0.0


def caveats(cfg: Mapping[str, Any]) -> list[str]:
    """Config features the GGUF cannot carry but which only matter past some length (reported, not fatal)."""
    return [text for check in (_window_caveat, _longrope_caveat) if (text := check(cfg))]


def _window_caveat(cfg: Mapping[str, Any]) -> str | None:
    spec = ARCHS.get(cfg.get("model_type"))
    if spec is not None and spec.applies_sliding_window:
        return None
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < cfg.get("max_position_embeddings", 0):
        return (f"sliding_window={window}: llama.cpp attends to the whole context for this architecture, so "
                f"outputs differ from transformers on sequences longer than {window} tokens")
    return None


def _longrope_caveat(cfg: Mapping[str, Any]) -> str | None:
    try:
        hp = hparams(cfg)
    except (KeyError, TypeError):
        return None
    orig = hp.rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if hp.rope["rope_type"] not in ("longrope", "su") or not orig or hp.n_ctx <= orig:
        return None
    return (f"longrope: llama.cpp uses the long rope factors for every prompt once its context (-c) exceeds {orig} "
            f"tokens, transformers only for sequences longer than {orig}; run llama.cpp with -c {orig} or less "
            "to get the trained model's outputs on prompts that fit (the gate does)")


def arch_spec(cfg: Mapping[str, Any]) -> ArchSpec:
    return ARCHS[check_supported(cfg, "the GGUF writer")]


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
    rope: Mapping[str, Any]  # rope_type, rope_theta, factor, ... (the full-attention layers' when they differ)
    tied: bool
    vocab_size: int
    n_rot: int  # rotated dims per head (partial_rotary_factor < 1 rotates only the first part, Phi-4-mini)
    rope_swa: Mapping[str, Any] | None = None  # the sliding-window layers' rope (Gemma 3), when separate


def hparams(cfg: Mapping[str, Any]) -> HParams:
    n_head = cfg["num_attention_heads"]
    # transformers 5 writes `rope_parameters` (per layer type for Gemma 3); 4.x wrote `rope_theta` +
    # `rope_scaling` (with "type" or "rope_type")
    params = dict(cfg.get("rope_parameters") or {})
    rope_swa = params.get("sliding_attention")
    rope = dict(params.get("full_attention", params))
    if not rope:
        legacy = dict(cfg.get("rope_scaling") or {})
        rope = {"rope_theta": cfg.get("rope_theta", 10000.0), **legacy}
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rotary = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return HParams(
        n_layer=cfg["num_hidden_layers"],
        n_embd=cfg["hidden_size"],
        n_ff=cfg["intermediate_size"],
        n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head,
        head_dim=head_dim,
        n_ctx=cfg.get("max_position_embeddings", 2048),
        rms_eps=cfg.get("rms_norm_eps", 1e-6),
        rope=rope,
        tied=bool(cfg.get("tie_word_embeddings", False)),
        vocab_size=cfg["vocab_size"],
        n_rot=int(head_dim * rotary),
        rope_swa=dict(rope_swa) if rope_swa else None,
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
    (Keys.Rope.DIMENSION_COUNT, "n_rot", GGUFValueType.UINT32),
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


def _rope_longrope(rope, hp):
    """Phi-3 "longrope"/"su": per-frequency factors for short and long contexts as two tensors; llama.cpp picks
    one by context size (as transformers does by sequence length) and scales attention by the same factor."""
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long or not short or len(long) != len(short) or len(long) != hp.n_rot // 2:
        raise FormatError(f"longrope needs long_factor and short_factor of {hp.n_rot // 2} values each "
                          f"(rotary dims / 2); got {len(long or [])} and {len(short or [])}")
    orig = rope["original_max_position_embeddings"]
    scale = hp.n_ctx / orig
    attn = rope.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
    items = [(Keys.Rope.SCALING_TYPE, RopeScalingType.LONGROPE.value, GGUFValueType.STRING),
             (Keys.Rope.SCALING_ATTN_FACTOR, float(attn), GGUFValueType.FLOAT32)]
    extra = {f"{TENSOR_NAMES[T.ROPE_FACTORS_LONG]}.weight": np.asarray(long, dtype=np.float32),
             f"{TENSOR_NAMES[T.ROPE_FACTORS_SHORT]}.weight": np.asarray(short, dtype=np.float32)}
    return items, extra


# rope_type -> handler(rope params, hparams) -> (metadata items, extra F32 tensors)
ROPE_SCALING = {"default": _rope_none, "linear": _rope_linear, "llama3": _rope_llama3,
                "longrope": _rope_longrope, "su": _rope_longrope}


# ------------------------------------------------------------------------------ per-arch metadata hooks


def _smollm3_meta(cfg: Mapping[str, Any], hp: HParams) -> list[Item]:
    # llama.cpp's smollm3 graph has no key for this: it skips rope on every 4th layer, always. A config with
    # another pattern would run with the wrong layers rotated, so it is refused, not approximated.
    step = 4
    want = [int((i + 1) % step != 0) for i in range(hp.n_layer)]
    got = list(cfg.get("no_rope_layers") or want)
    if got != want:
        raise FormatError(f"smollm3 no_rope_layers {got} is not llama.cpp's fixed pattern (no rope on every "
                          f"{step}th layer: {want}); the GGUF cannot hold it")
    return []


def _phi3_meta(cfg: Mapping[str, Any], hp: HParams) -> list[Item]:
    orig = hp.rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", hp.n_ctx))
    # llama.cpp's converter writes 0 for "no window" (Phi-4-mini); llama.cpp currently ignores Phi-3's window
    return [(Keys.Rope.SCALING_ORIG_CTX_LEN, int(orig), GGUFValueType.UINT32),
            (Keys.Attention.SLIDING_WINDOW, int(cfg.get("sliding_window") or 0), GGUFValueType.UINT32)]


# llama.cpp's gemma3 alternates sliding and full layers with this period when no per-layer pattern is given
_GEMMA3_SWA_PERIOD = 6


def _gemma3_meta(cfg: Mapping[str, Any], hp: HParams) -> list[Item]:
    # llama.cpp fixes the attention scale: 1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the 62-layer 27B
    expected = hp.n_embd / hp.n_head if hp.n_layer == 62 else hp.head_dim
    scalar = cfg.get("query_pre_attn_scalar", hp.head_dim)
    if scalar != expected:
        raise FormatError(f"gemma3 query_pre_attn_scalar={scalar}, but llama.cpp scales attention by "
                          f"1/sqrt({expected:g}) for this model; the GGUF cannot hold another scale")
    if cfg.get("attn_logit_softcapping"):
        raise FormatError("gemma3 attn_logit_softcapping is set; llama.cpp's gemma3 graph has no attention softcap")
    items: list[Item] = []
    if cfg.get("final_logit_softcapping"):
        items.append((Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float(cfg["final_logit_softcapping"]), GGUFValueType.FLOAT32))
    swa = [t == "sliding_attention" for t in cfg.get("layer_types") or []]
    if any(swa):
        items.append((Keys.Attention.SLIDING_WINDOW, int(cfg["sliding_window"]), GGUFValueType.UINT32))
        default = [(i % _GEMMA3_SWA_PERIOD) < _GEMMA3_SWA_PERIOD - 1 for i in range(hp.n_layer)]
        if swa != default:  # llama.cpp also reads the pattern as one bool per layer
            items.append((Keys.Attention.SLIDING_WINDOW_PATTERN, swa, GGUFValueType.ARRAY))
        if hp.rope_swa:
            items.append((Keys.Rope.FREQ_BASE_SWA, float(hp.rope_swa["rope_theta"]), GGUFValueType.FLOAT32))
    return items


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(MODEL_ARCH.LLAMA, {**_BASE, **_ATTN_BIAS}, permute_qk=True),
    "mistral": ArchSpec(MODEL_ARCH.LLAMA, _BASE, permute_qk=True),
    "qwen2": ArchSpec(MODEL_ARCH.QWEN2, {**_BASE, **_ATTN_BIAS}, permute_qk=False),
    "qwen3": ArchSpec(MODEL_ARCH.QWEN3, {**_BASE, **_QK_NORM}, permute_qk=False),
    "smollm3": ArchSpec(MODEL_ARCH.SMOLLM3, _BASE, permute_qk=True, extra_meta=_smollm3_meta),
    "phi3": ArchSpec(MODEL_ARCH.PHI3, _PHI3, permute_qk=False, extra_meta=_phi3_meta),
    "gemma3_text": ArchSpec(MODEL_ARCH.GEMMA3, _GEMMA3, permute_qk=False, norm_shift=(_NORMS, 1.0),
                            extra_meta=_gemma3_meta, applies_sliding_window=True),
}


def model_metadata(spec: ArchSpec, hp: HParams, cfg: Mapping[str, Any] | None = None
                   ) -> tuple[list[Item], dict[str, np.ndarray]]:
    """Arch metadata (key, value, type) and extra tensors (rope factors) for one model."""
    rope_type = hp.rope["rope_type"]
    if rope_type not in ROPE_SCALING:
        raise FormatError(f"rope scaling {rope_type!r} is not supported by the GGUF writer; "
                          f"supported: {', '.join(ROPE_SCALING)}")
    items = [(key, field(hp) if callable(field) else getattr(hp, field), vtype) for key, field, vtype in _META]
    rope_items, extra = ROPE_SCALING[rope_type](hp.rope, hp)
    items += rope_items
    if spec.extra_meta is not None:
        items += spec.extra_meta(cfg or {}, hp)
    return [(key.format(arch=spec.name), value, vtype) for key, value, vtype in items], extra
