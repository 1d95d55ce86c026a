"""llama.cpp's Phi-3 name rule: general.name containing "phi3"/"phi-3" changes how llama.cpp tokenizes.

With the rule on, llama.cpp strips whitespace after every special token except <unk>, <s>, <|endoftext|> (as
Phi-3's tokenizer.json does with rstrip) and looks up "</s>", "<unk>", "<s>", "<|endoftext|>" by text. lorax
names the GGUF so the rule is on exactly when the HF tokenizer rstrips that way (formats/gguf/names.py):
- a tiny phi3 with a byte-level BPE (no rstrip) in a folder named "phi3-...": without the guard llama.cpp
  cannot even load the vocabulary; with it the name reads "Phi 3-..." and ids equal transformers';
- a Phi-3-style SentencePiece tokenizer (rstrip on <|user|>, <|end|>, ...) in a folder named "tiny": without
  the guard llama.cpp keeps the newline after <|user|> that transformers drops; with it " phi3" is appended.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from gguf import GGUFReader, TokenType
from tiny_models import build_tiny_model, corpus

from formats.errors import FormatError
from formats.gguf import names, writer
from formats.gguf.conformance import check_tokenizer, probe_texts
from formats.gguf.tokenizer import load_hf_tokenizer
from formats.gguf.writer import write_gguf

PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-3's added tokens: (text, special, rstrip)
PHI3_ADDED = (("<|endoftext|>", True, False), ("<|assistant|>", True, True), ("<|system|>", True, True),
              ("<|end|>", True, True), ("<|user|>", True, True))


def build_phi3_spm_model(out: Path) -> Path:
    """A tiny phi3 with a Phi-3-mini style tokenizer: Llama-2 SentencePiece + Phi-3's rstrip added tokens."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    out.mkdir(parents=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=640, model_type="bpe", byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2, num_threads=1)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, legacy=True)
    tok.add_tokens([AddedToken("</s>", special=False, rstrip=True, normalized=False)])  # as Phi-3's file says
    tok.add_tokens([AddedToken(t, special=s, rstrip=r, normalized=False) for t, s, r in PHI3_ADDED],
                   special_tokens=True)
    tok.eos_token, tok.chat_template = "<|endoftext|>", PHI3_TEMPLATE
    build_tiny_model(out, arch="phi3", tokenizer=tok)
    cfg_path = out / "tokenizer_config.json"  # transformers 5 does not persist these two
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "legacy": True, "add_bos_token": True}))
    return out


@pytest.fixture(scope="module")
def phi3_spm(tmp_path_factory) -> Path:
    return build_phi3_spm_model(tmp_path_factory.mktemp("names") / "tiny")


def gguf_name_of(path: Path) -> str:
    return GGUFReader(path).fields["general.name"].contents()


def test_rstrip_tokenizer_is_named_for_the_rule_and_conforms(phi3_spm, tmp_path):
    tok = load_hf_tokenizer(phi3_spm)
    user = tok.convert_tokens_to_ids("<|user|>")
    render = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    ids = tok(render, add_special_tokens=False)["input_ids"]
    assert ids[ids.index(user) + 1] != tok.convert_tokens_to_ids("<0x0A>")  # transformers drops the \n
    out = write_gguf(phi3_spm, tmp_path / "m.gguf", "f32", progress=False)
    assert gguf_name_of(out) == "tiny phi3"
    report = check_tokenizer(tok, out)
    assert report.probes == len(probe_texts(tok))


def test_rstrip_tokenizer_without_the_name_fails(phi3_spm, tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "gguf_name", lambda name, *_: name)  # the planted fault: the folder's name
    out = write_gguf(phi3_spm, tmp_path / "m.gguf", "f32", progress=False)
    assert gguf_name_of(out) == "tiny"
    with pytest.raises(FormatError, match=r"tokenizer mismatch on '<\|user\|>\\n"):
        check_tokenizer(load_hf_tokenizer(phi3_spm), out)


def test_phi3_folder_name_on_a_plain_tokenizer(tiny_model_factory, tmp_path, monkeypatch):
    from llama_cpp import Llama

    model = tiny_model_factory(arch="phi3")
    assert "phi3" in model.name  # the factory's folder: "phi3-tieNone-float32-N"
    out = write_gguf(model, tmp_path / "m.gguf", "f32", progress=False)
    assert gguf_name_of(out) == model.name.replace("phi3", "Phi 3")
    check_tokenizer(load_hf_tokenizer(model), out)
    monkeypatch.setattr(writer, "gguf_name", lambda name, *_: name)
    raw = write_gguf(model, tmp_path / "raw.gguf", "f32", progress=False)
    with pytest.raises(ValueError, match="Failed to load model"):  # llama.cpp: "</s>" is not in this vocab
        Llama(model_path=str(raw), vocab_only=True, verbose=False)


@pytest.mark.parametrize(("requested", "fits", "written"), [
    ("Phi-3.5-mini-instruct", False, "Phi 3.5-mini-instruct"),
    ("my-PHI3-tune", False, "my-Phi 3-tune"),
    ("merged", False, "merged"),
    ("merged", True, "merged phi3"),
    ("Phi-3.5-mini-instruct", True, "Phi-3.5-mini-instruct"),
])
def test_name_table(requested, fits, written):
    tokens = ["<unk>", "<s>", "</s>", "a", "<|endoftext|>", "<|user|>"]
    types = [TokenType.CONTROL, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.NORMAL, TokenType.CONTROL,
             TokenType.CONTROL]
    rstrip = {2, 5} if fits else set()
    assert names.gguf_name(requested, tokens, types, rstrip) == written
    # the rule needs all four looked-up tokens, and rstrip on exactly the others
    assert not names.rule_fits(names.RULES[0], tokens[1:], types[1:], {1, 4})
    assert not names.rule_fits(names.RULES[0], tokens, types, {2})
