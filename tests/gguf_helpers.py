"""Helpers for the GGUF tests: parity measurement, a tiny SentencePiece model, a random PEFT LoRA, text.

Kept out of conftest so only the GGUF tests pay for them.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path

from tiny_models import corpus

from exporter.gate.metrics import Parity, compare

# Llama-2 chat format: the template writes BOS itself (the double-BOS case when add_bos is also set).
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% else %}{{ '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}{% endif %}{% endfor %}"
)

# Plain English for the real-model tests (written for these tests; about 600 SmolLM2 tokens).
ENGLISH = """\
The river town woke slowly on market days. Before sunrise the bakers had already lit their ovens, and the
smell of fresh bread drifted down the narrow streets toward the water. Fishermen pulled their boats onto the
gravel, sorted the night's catch into wooden crates, and argued about the weather in low voices. By the time
the church bell rang seven, the square was full of carts, baskets and people who had walked in from the
surrounding farms.

Most visitors came for the cheese. A family on the hill had made it the same way for four generations,
pressing the curds by hand and aging the wheels in a cellar cut into the rock. They sold out before noon,
every week, and refused every offer to grow. "If we made more," the grandmother liked to say, "it would
taste like everyone else's." Nobody in town could argue with that.

In the afternoon the square emptied as quickly as it had filled. Children ran along the river path, chasing
ducks and throwing sticks into the current to see whose would reach the old stone bridge first. Their
parents sat on benches outside the cafe, drinking coffee and counting the money they had made. The
schoolteacher, who also ran the small library, stayed open late on market days because farmers who rarely
came to town liked to borrow books about machines, medicine and distant countries.

Winter changed everything. The river froze at the edges, the boats stayed on the shore, and the market
moved into the old grain hall, where a stove in the corner kept the worst of the cold away. Fewer people
came, but those who did stayed longer, trading news as much as goods. The baker started making a dark,
heavy bread with seeds and honey that people claimed could keep a traveller warm for a whole day on the
road. Whether that was true or not, it sold better than anything else he made.

Years later, when a new road connected the town to the city, many people expected the market to disappear.
Large shops opened near the highway, selling cheaper food in bright packages, and for a while the square
was quieter than anyone could remember. But slowly the visitors returned. They said they came for the
cheese, the bread and the view of the river, yet what they really seemed to want was the feeling of a place
where people knew each other's names, where prices were written by hand, and where nobody was in a hurry.

Today the market still opens every Saturday at dawn. The cheese family has a website now, though they
still refuse to make more than they can press by hand. The library has computers as well as books, and
the schoolteacher's granddaughter teaches children to write simple programs that count ducks on the river.
The bell still rings at seven, the carts still rattle over the stones, and the smell of bread still drifts
down to the water, exactly as it did a hundred years ago.
"""


def tiny_text() -> str:
    """Text the tiny tokenizer was trained on: well over 512 of its tokens."""
    return "\n".join(corpus(80))


@functools.lru_cache(maxsize=16)
def reference(hf_dir: Path, n_tokens: int = 512, text: str | None = None):
    """(ids, HF logits) for a model dir, cached: many GGUFs of one model are compared with one HF run."""
    from formats.hf.runner import HFRunner

    hf = HFRunner(hf_dir)
    ids = hf.tokenize(text or tiny_text())[:n_tokens]
    assert len(ids) == n_tokens, f"probe text too short: {len(ids)} tokens"
    return ids, hf.logits(ids)


def parity(hf_dir: Path, gguf_path: Path, n_tokens: int = 512, text: str | None = None,
           lora_path: Path | None = None, n_threads: int | None = 1) -> Parity:
    """Teacher-forced logits of the HF model vs llama.cpp on the same `n_tokens` ids."""
    ids, ref = reference(Path(hf_dir), n_tokens, text)
    return compare([ref], [gguf_logits(gguf_path, ids, lora_path, n_threads)], [ids])


def gguf_logits(gguf_path: Path, ids: list[int], lora_path: Path | None = None, n_threads: int | None = 1):
    """llama.cpp logits; one thread by default (tiny models; OpenMP spinning is slow on a busy 2-core box)."""
    from formats.gguf.runner import GGUFRunner

    with GGUFRunner(gguf_path, n_ctx=max(1024, len(ids)), lora_path=lora_path, n_threads=n_threads) as g:
        return g.logits(ids)


def build_spm_model(out_dir: Path, vocab_size: int = 640, legacy: bool = True) -> Path:
    """A tiny Llama whose tokenizer is a Llama-2 style SentencePiece BPE (byte fallback, tokenizer.model)."""
    import sentencepiece as spm
    import torch
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2, num_threads=1)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    # transformers converts tokenizer.model into its fast tokenizer; Llama-2 adds BOS to every text
    tok = transformers.LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=True, legacy=legacy)
    tok.chat_template = LLAMA2_TEMPLATE
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    # transformers 5 does not persist `legacy`; without it a reload silently switches to legacy=False
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(legacy=legacy, add_bos_token=True)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir


def build_lora(base_dir: Path, adapter_dir: Path, merged_dir: Path, *, seed: int = 1, **lora_kw) -> None:
    """A random (non-zero B) PEFT LoRA on `base_dir`, saved, and merged with PEFT's merge_and_unload."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kw = {"r": 8, "lora_alpha": 16, "init_lora_weights": False,
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    peft_model = get_peft_model(model, LoraConfig(**{**kw, **lora_kw}))
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged_dir)


def copy_with_json(src: Path, dst: Path, filename: str, edit) -> Path:
    """Copy a model dir and rewrite one JSON file in it with `edit(dict) -> None`."""
    shutil.copytree(src, dst)
    path = dst / filename
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return dst


def with_attention_bias(src: Path, dst: Path, seed: int = 3) -> Path:
    """A copy of a tiny Llama with attention_bias=True and non-zero random q/k/v/o biases."""
    import torch
    import transformers

    shutil.copytree(src, dst)
    cfg = transformers.AutoConfig.from_pretrained(dst)
    cfg.attention_bias = True
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(dst)
    return dst
