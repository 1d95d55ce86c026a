"""Tiny random causal LMs with a real (trained, byte-level BPE) tokenizer and a chat template.

Built in fixtures so tests never touch the network. Sizes are a few hundred K parameters; all
projection dims are multiples of 64 so 4-bit blockwise quantization (blocksize 64) applies as it
does on real models. Weights are stored in float32 unless asked otherwise.
"""

from __future__ import annotations

import json
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


# model_type -> (config class name, extra config kwargs)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
}


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    hidden_size: int = 64,
    intermediate_size: int = 192,
    num_layers: int = 2,
    rope_theta: float = 10000.0,
) -> Path:
    """Save a tiny random causal LM + tokenizer to `out_dir` and return the path."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    cls_name, extra = ARCHS[arch]
    config = getattr(transformers, cls_name)(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        # A wide init gives peaked next-token distributions, so parity metrics have something to measure.
        initializer_range=0.2,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
