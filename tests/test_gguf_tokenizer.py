"""Tokenizer conformance: HF and llama.cpp (on the written GGUF) give the same ids, or the export fails.

Passes on the tiny byte-level BPE (SmolLM2-style pre-tokenizer), on llama3/qwen2-style pre-tokenizers and
on a Llama-2 style SentencePiece model; fails when a merge, a special token, the BOS flag or the
pre-tokenizer name is corrupted in the GGUF.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gguf_helpers import build_spm_model, copy_with_json
from tiny_models import SPECIAL_TOKENS, corpus

from formats.errors import FormatError
from formats.gguf import conformance, tokenizer
from formats.gguf.conformance import check_tokenizer
from formats.gguf.tokenizer import load_hf_tokenizer, load_vocab
from formats.gguf.writer import write_gguf


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    return build_spm_model(tmp_path_factory.mktemp("spm") / "llama2")


def gguf_of(model_dir: Path, out: Path, **vocab_edits) -> Path:
    vocab = load_vocab(model_dir, json.loads((model_dir / "config.json").read_text())["vocab_size"])
    for key, value in vocab_edits.items():
        setattr(vocab, key, value)
    return write_gguf(model_dir, out, "f32", vocab=vocab, progress=False)


def test_tiny_bpe_passes(tiny_model_dir, tmp_path):
    report = check_tokenizer(load_hf_tokenizer(tiny_model_dir), gguf_of(tiny_model_dir, tmp_path / "m.gguf"))
    assert report.probes >= 30 and report.warnings == []


def test_sentencepiece_passes_with_the_two_known_warnings(spm_dir, tmp_path):
    out = gguf_of(spm_dir, tmp_path / "spm.gguf")
    tok = load_hf_tokenizer(spm_dir)
    assert tokenizer.measure_added_specials(tok) == (True, False)  # Llama-2 adds BOS, not EOS
    report = check_tokenizer(tok, out)
    assert report.warnings == [conformance.SPM_LEADING_SPACE, report.warnings[1]]
    assert report.warnings[1].startswith("double BOS: the chat template starts with '<s>'")


def test_sentencepiece_without_legacy_spaces_fails(tmp_path):
    # transformers' legacy=False drops the "▁" after special tokens; llama.cpp (like sentencepiece) keeps
    # it, which no GGUF flag can change: the check must refuse such a tokenizer, not paper over it
    model = build_spm_model(tmp_path / "nolegacy", legacy=False)
    with pytest.raises(FormatError, match=r"tokenizer mismatch on .*word"):
        check_tokenizer(load_hf_tokenizer(model), gguf_of(model, tmp_path / "m.gguf"))


@pytest.mark.parametrize("family", ["llama-bpe", "qwen2"])
def test_structure_table_names_match_llama_cpp_behaviour(tiny_model_dir, tmp_path, family):
    """Retrain the tiny tokenizer with a Llama-3 / Qwen2 split regex; the detected name must conform."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    regex = {"llama-bpe": tokenizer._LLAMA3_RE, "qwen2": tokenizer._QWEN2_RE}[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = tmp_path / family
    shutil.copytree(tiny_model_dir, model)
    tok.save(str(model / "tokenizer.json"))
    out = gguf_of(model, tmp_path / "m.gguf")
    assert load_vocab(model, 512).pre == family
    check_tokenizer(load_hf_tokenizer(model), out)


def test_pre_tokenizer_detection_table_and_failures():
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}}
    assert tokenizer.pre_name(smollm, encode=None) == "smollm"
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert tokenizer.pre_name(gpt2, encode=None) == "gpt-2"
    odd = {"pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(FormatError, match="unknown pre-tokenizer.*Supported: gpt-2, llama-bpe, qwen2, smollm"):
        tokenizer.pre_name(odd, encode=lambda text: [len(text)])


def test_corrupted_merge_fails(tiny_model_dir, tmp_path):
    merges = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    broken = copy_with_json(tiny_model_dir, tmp_path / "broken", "tokenizer.json",
                            lambda tj: tj["model"]["merges"].pop(0))
    assert len(json.loads((broken / "tokenizer.json").read_text())["model"]["merges"]) == len(merges) - 1
    out = write_gguf(broken, tmp_path / "m.gguf", "f32", progress=False)
    with pytest.raises(FormatError, match=r"tokenizer mismatch on .* HF \[.*\] vs llama\.cpp \["):
        check_tokenizer(load_hf_tokenizer(tiny_model_dir), out)


def test_corrupted_special_token_fails(tiny_model_dir, tmp_path):
    tokens = load_vocab(tiny_model_dir, 512).tokens
    tokens[2] = "<|im_stop|>"  # <|im_end|> renamed: llama.cpp no longer finds it in chat text
    out = gguf_of(tiny_model_dir, tmp_path / "m.gguf", tokens=tokens)
    with pytest.raises(FormatError, match="tokenizer mismatch"):
        check_tokenizer(load_hf_tokenizer(tiny_model_dir), out)


def test_wrong_bos_flag_fails(tiny_model_dir, tmp_path):
    out = gguf_of(tiny_model_dir, tmp_path / "m.gguf", add_bos=True)
    with pytest.raises(FormatError, match=r"add_special=True\) at token 0"):
        check_tokenizer(load_hf_tokenizer(tiny_model_dir), out)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_wrong_pre_tokenizer_fails(tiny_model_dir, tmp_path, pre):
    out = gguf_of(tiny_model_dir, tmp_path / "m.gguf", pre=pre)
    with pytest.raises(FormatError, match="tokenizer mismatch"):
        check_tokenizer(load_hf_tokenizer(tiny_model_dir), out)


def test_first_difference():
    assert conformance.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert conformance.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert conformance.first_difference([1, 2], [1, 2, 3]) == 2
