"""A tiny Gemma 3 with Gemma's own kind of tokenizer: SentencePiece BPE (tokenizer.model) with byte fallback.

Real Gemma 3 ships `tokenizer.model` (BPE, byte_fallback, no dummy prefix, digits split, `<pad>`=0 `<eos>`=1
`<bos>`=2 `<unk>`=3, user-defined `<start_of_turn>`/`<end_of_turn>`), the `tokenizer.json` transformers built
from it, and a `tokenizer_config.json` whose `added_tokens_decoder` says which added tokens are special, with
`add_bos_token: true`. This builds the same kinds of files from a SentencePiece model trained here on
`tiny_models.corpus()` (no network), through transformers' GemmaTokenizer and `save_pretrained`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from tiny_models import build_tiny_model, corpus

# Gemma 3's chat format (written for these tests): BOS in the template, "model" for the assistant, the system
# prompt folded into the first user turn, every turn closed by <end_of_turn> and a newline.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + (m['content'] | trim) }}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# SentencePiece user-defined pieces in Gemma's order (ids 4...): the mask, Gemma's odd "[@BOS@]", unused slots,
# the turn markers; then a run of two spaces and of two newlines, which Gemma also keeps as whole pieces.
USER_DEFINED = ("<mask>", "[@BOS@]", "<unused0>", "<unused1>", "<start_of_turn>", "<end_of_turn>", "▁▁", "\n\n")
# the added tokens real Gemma 3 marks special in tokenizer_config.json (the others are plain added tokens)
SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<unused0>", "<unused1>", "<start_of_turn>",
           "<end_of_turn>")


def train_gemma_spm(vocab_size: int = 640) -> bytes:
    """A serialized SentencePiece BPE model with Gemma's settings and special pieces."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=list(USER_DEFINED), character_coverage=1.0, minloglevel=2,
        num_threads=1)
    return buf.getvalue()


def build_gemma_tokenizer(work_dir: Path):
    """transformers' GemmaTokenizer built from a freshly trained tokenizer.model in `work_dir`."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "tokenizer.model").write_bytes(train_gemma_spm())
    tok = GemmaTokenizer.from_pretrained(str(work_dir), add_bos_token=True, add_eos_token=False)
    # transformers makes every user-defined piece a plain added token; Gemma marks these special
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL if t in USER_DEFINED],
                   special_tokens=True)
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    return tok


def build_gemma3_spm_model(out_dir: Path) -> Path:
    """A tiny random Gemma 3 text model saved with the Gemma tokenizer files (tokenizer.model + tokenizer.json)."""
    out_dir = Path(out_dir)
    tok = build_gemma_tokenizer(out_dir)
    build_tiny_model(out_dir, arch="gemma3", tokenizer=tok)
    # what transformers 5 leaves out of tokenizer_config.json and real Gemma 3 files carry
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False, added_tokens_decoder={
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.added_tokens_decoder.items())})
    assert Path(cfg["vocab_file"]).is_absolute()  # where it was converted from (the export must not ship it)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    assert (out_dir / "tokenizer.model").is_file() and (out_dir / "tokenizer.json").is_file()
    return out_dir
