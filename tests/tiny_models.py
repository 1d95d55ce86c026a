"""Tiny random causal LMs with a real (trained, byte-level BPE) tokenizer and a chat template.

Built in fixtures so tests never touch the network. Sizes are a few hundred K parameters; all
projection dims are multiples of 64 so 4-bit blockwise quantization (blocksize 64) applies as it
does on real models. Weights are stored in float32 unless asked otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a model adapter weight merge export token layer quantized float check drift report train "
    "loss step batch rank alpha gradient matrix vector cache prompt answer json name city age color "
    "red green blue Paris Berlin Tokyo Lima one two three four five llama onnx gguf value key"
).split()


def corpus(n: int = 400) -> list[str]:
    """Deterministic training text for the tokenizer: words, digits, JSON, code, Unicode."""
    lines = []
    for i in range(n):
        w = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(8 + i % 5)]
        lines.append(" ".join(w).capitalize() + f". Number {i * 37 % 1000}.")
        lines.append(json.dumps({"name": w[0], "city": w[1], "age": i % 90}))
        if i % 10 == 0:
            lines.append(f"def f{i}(x):\n    return x * {i} + 1\n")
            lines.append("Grüße, naïve café — 東京 🚀")
        lines.append("system user assistant You are a tiny test model. Hello world!")
    return lines


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # SmolLM2-style pre-tokenization: single digits, then GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Llama 3.2 (1B/3B): tied embeddings and llama3 rope scaling; a short original context puts some of the
# tiny model's frequencies on each part of the ramp.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
# Phi-4-mini: partial rotary (0.75 of each head), longrope with per-frequency short/long factors, tied
# embeddings. 512-token tests run below the original context, so the short factors apply (non-trivial here).
PHI3_ROT = 12  # 0.75 * head_dim 16
PHI3_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
             "original_max_position_embeddings": 1024,
             "short_factor": [1.0 + 0.1 * i for i in range(PHI3_ROT // 2)],
             "long_factor": [2.0 + 0.5 * i for i in range(PHI3_ROT // 2)]}
# Gemma 3: 6 layers = llama.cpp's default pattern (5 sliding, 1 full); a 16-token window that every test
# sequence runs past; local/global rope bases as in Gemma 3 1B; query_pre_attn_scalar = head_dim (1B's).
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}

# name -> (config class name, config kwargs that override the defaults below). Names are model_types, or
# a model_type plus the variant (llama3.2 is model_type llama).
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "llama3.2": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "smollm3": ("SmolLM3Config", {"num_hidden_layers": 4, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 2000000.0}}),
    "phi3": ("Phi3Config", {"rope_parameters": PHI3_ROPE, "original_max_position_embeddings": 1024,
                            "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"num_hidden_layers": 6, "sliding_window": 16, "query_pre_attn_scalar": 16,
                                    "rope_parameters": GEMMA3_ROPE, "tie_word_embeddings": True}),
}


@dataclass(frozen=True)
class TinySpec:
    """Sizes and settings of a tiny model (None: the architecture's default in ARCHS)."""

    tie_word_embeddings: bool | None = None
    seed: int = 0
    dtype: str = "float32"
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int | None = None
    rope_theta: float | None = None


def build_tiny_model(out_dir: str | Path, arch: str = "llama", spec: TinySpec = TinySpec(), tokenizer=None) -> Path:
    """Save a tiny random causal LM + tokenizer to `out_dir` and return the path (None: the arch's default)."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer()
    cls_name, extra = ARCHS[arch]
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=spec.hidden_size // 4,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # A wide init gives peaked next-token distributions, so parity metrics have something to measure.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(extra)
    if spec.num_layers is not None:
        kwargs["num_hidden_layers"] = spec.num_layers
    if spec.tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = spec.tie_word_embeddings
    if spec.rope_theta is not None:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
