"""Gemma 3's own kind of tokenizer (SentencePiece BPE with byte fallback, tokenizer.model + tokenizer.json) through
lorax's GGUF writer and ONNX export dir, on a tiny Gemma 3 built in a fixture (tests/tiny_gemma.py, no network).

llama.cpp's ids equal transformers' on every conformance probe (inline special tokens, Gemma chat renders);
llama.cpp reads `<end_of_turn>` as the end-of-turn token; planted faults in the vocabulary fail the check.
The metadata comparison with llama.cpp's own converter is the slow test in test_archs_converter.py.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from gguf import GGUFReader, TokenType
from tiny_gemma import GEMMA3_CHAT_TEMPLATE, build_gemma3_spm_model

from formats.errors import FormatError
from formats.gguf.conformance import check_tokenizer, probe_texts
from formats.gguf.tokenizer import load_hf_tokenizer, load_vocab
from formats.gguf.writer import write_gguf

DOUBLE_BOS = "double BOS: the chat template starts with '<bos>'"
# whitespace runs the Gemma "▁▁" piece must split as transformers does (beside the probe set's own)
SPACES = ("a  b", "c   d", "x    y z", "  lead", "trail  ", "\n\n\nz", "a \n\n b", "tab\t\t  mixed \n  ")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    return build_gemma3_spm_model(tmp_path_factory.mktemp("gemma-spm") / "tiny-g3")


@pytest.fixture(scope="module")
def tok(gemma):
    return load_hf_tokenizer(gemma)


@pytest.fixture(scope="module")
def gguf(gemma, tmp_path_factory) -> Path:
    return write_gguf(gemma, tmp_path_factory.mktemp("gemma-gguf") / "g3.gguf", "f32", progress=False)


def gguf_with(gemma: Path, out: Path, edit) -> Path:
    vocab = copy.deepcopy(load_vocab(gemma, json.loads((gemma / "config.json").read_text())["vocab_size"]))
    edit(vocab)
    return write_gguf(gemma, out, "f32", vocab=vocab, progress=False)


def llama_ids(gguf_path: Path, texts, add_bos: bool = False) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [list(llm.tokenize(t.encode(), add_bos=add_bos, special=True)) for t in texts]
    finally:
        llm.close()


def test_fixture_is_a_gemma_style_sentencepiece_tokenizer(gemma, tok):
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    proto.ParseFromString((gemma / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.model_type == spm_pb.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert not proto.normalizer_spec.add_dummy_prefix
    assert type(tok).__name__ == "GemmaTokenizer" and (gemma / "tokenizer.json").is_file()
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok("a b")["input_ids"][0] == tok.bos_token_id  # add_bos, as Gemma
    render = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert render == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(render, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<start_of_turn>")) == 2  # one token each, not spelled out


def test_ids_equal_on_every_probe(tok, gguf):
    probes = probe_texts(tok)
    assert any("<start_of_turn>" in t and "<end_of_turn>" in t for t, _ in probes)  # inline specials
    assert sum(t.startswith("<bos><start_of_turn>user\n") for t, _ in probes) == 4  # chat renders
    report = check_tokenizer(tok, gguf)
    print(f"\ngemma3 spm: ids equal on {report.probes} probes")
    assert report.probes == len(probes) == 32
    assert len(report.warnings) == 1 and report.warnings[0].startswith(DOUBLE_BOS)  # Gemma's template writes BOS
    assert llama_ids(gguf, SPACES) == [tok(t, add_special_tokens=False)["input_ids"] for t in SPACES]


def test_llama_cpp_reads_gemma_specials(tok, gguf):
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        eot = llama_cpp.llama_vocab_eot(vocab)
        assert eot == tok.convert_tokens_to_ids("<end_of_turn>")
        assert llama_cpp.llama_vocab_is_eog(vocab, eot) and llama_cpp.llama_vocab_is_eog(vocab, tok.eos_token_id)
        start = tok.convert_tokens_to_ids("<start_of_turn>")
        for tid in (eot, start, tok.pad_token_id, tok.bos_token_id):
            assert llama_cpp.llama_vocab_get_attr(vocab, tid) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, tid
        assert (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)) == (2, 1)
        assert llama_cpp.llama_vocab_get_add_bos(vocab) and not llama_cpp.llama_vocab_get_add_eos(vocab)
        assert llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
    finally:
        llm.close()
    fields = {k: f.contents() for k, f in GGUFReader(gguf).fields.items() if k.startswith("tokenizer.")}
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.chat_template"] == GEMMA3_CHAT_TEMPLATE
    assert fields["tokenizer.ggml.mask_token_id"] == tok.convert_tokens_to_ids("<mask>")


def _retype(text: str, kind: TokenType):
    def edit(vocab):
        vocab.types[vocab.tokens.index(text)] = kind
    return edit


def test_a_special_piece_typed_normal_fails(gemma, tok, tmp_path):
    """What llama.cpp's converter writes when tokenizer_config.json has no added_tokens_decoder (transformers 5
    saves none): the SentencePiece user-defined <start_of_turn> as a NORMAL piece, spelled out in llama.cpp."""
    bad = gguf_with(gemma, tmp_path / "bad.gguf", _retype("<start_of_turn>", TokenType.NORMAL))
    with pytest.raises(FormatError, match=r"tokenizer mismatch on 'head<bos>") as err:
        check_tokenizer(tok, bad)
    assert first_mismatch(str(err.value))[0] == tok.convert_tokens_to_ids("<start_of_turn>")


def first_mismatch(message: str) -> tuple[int, int]:
    """(HF id, llama.cpp id) where the conformance message says the two first differ."""
    windows = re.findall(r"(?:HF|llama\.cpp) \[(?:…, )?([\d, ]+)", message)
    hf, cpp = ([int(x) for x in w.split(",") if x.strip()] for w in windows)
    at = int(re.search(r"at token (\d+)", message).group(1))
    return hf[min(at, 8)], cpp[min(at, 8)]


def test_the_whitespace_piece_keeps_its_spelling_and_score(gemma, tok, tmp_path):
    """"▁▁" is a plain added token. llama.cpp's converter stores it as two spaces with the added-token score;
    then literal "▁▁" text splits differently from transformers. With the spelling kept but that score,
    llama.cpp merges it too late on ordinary double spaces. lorax keeps both (tests above: ids equal)."""
    i = tok.convert_tokens_to_ids("▁▁")

    def spaces(vocab):
        vocab.tokens[i], vocab.scores[i] = "  ", -1000.0

    def late(vocab):
        vocab.scores[i] = -1000.0

    with pytest.raises(FormatError, match=r"tokenizer mismatch on 'head<bos>word 0"):
        check_tokenizer(tok, gguf_with(gemma, tmp_path / "spaces.gguf", spaces))
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in SPACES]
    got = llama_ids(gguf_with(gemma, tmp_path / "late.gguf", late), SPACES)
    assert sum(g != w for g, w in zip(got, want, strict=True)) >= 3, got


def test_onnx_export_dir_carries_the_gemma_tokenizer(gemma, tok, tmp_path):
    """transformers.js reads tokenizer.json + tokenizer_config.json (chat template inline); transformers also
    tokenizer.model. The export dir alone must tokenize and render chats as the source dir does."""
    from transformers import AutoTokenizer

    from formats.onnx.export import export_onnx

    out = export_onnx(gemma, tmp_path / "onnx").dir
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() != b"", name
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == GEMMA3_CHAT_TEMPLATE and cfg["add_bos_token"] is True
    assert not any(str(v).startswith(str(gemma)) for v in cfg.values())  # no path of the build machine
    shipped = AutoTokenizer.from_pretrained(str(out))
    texts = [t for t, _ in probe_texts(tok)]
    assert [shipped(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    chat = [{"role": "user", "content": "Name a city."}]
    assert shipped.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_a_tokenizer_model_from_another_model_is_refused(gemma, tmp_path):
    """The merge takes the base's tokenizer.model when the adapter dir has only tokenizer.json (transformers 5
    saves no tokenizer.model); the writer checks that the two files number the pieces alike."""
    import shutil

    from tiny_gemma import train_gemma_spm

    other = tmp_path / "other"
    shutil.copytree(gemma, other)
    (other / "tokenizer.model").write_bytes(train_gemma_spm(vocab_size=600))
    with pytest.raises(FormatError, match=r"tokenizer.model has .* tokenizer.json at \d+; the two tokenizer files"):
        load_vocab(other, 640)


def test_transformers_js_reads_the_onnx_dir_tokenizer(gemma, tok, tmp_path):
    """transformers.js (Node) on the export dir as written: the ids of every probe and the chat renders equal
    transformers' (skipped without node/npm, failed under LORAX_REQUIRE_CLIENTS=1, as in test_clients.py)."""
    import os
    import subprocess

    from client_helpers import npm_dir, require_clients

    from formats.gguf.conformance import CONVERSATIONS
    from formats.onnx.export import export_onnx

    npm = npm_dir()
    if npm is None:
        if require_clients():
            pytest.fail("npm/node is missing and LORAX_REQUIRE_CLIENTS=1")
        pytest.skip("npm/node is not installed")
    out = export_onnx(gemma, tmp_path / "onnx").dir
    texts = [t for t, special in probe_texts(tok) if special]
    chats = [c for c in CONVERSATIONS if c[0]["role"] == "user"]
    req = {"dir": str(out), "texts": texts, "chats": chats}
    script = Path(__file__).parent / "clients" / "transformers_js_tokenizer.mjs"
    res = subprocess.run(["node", str(script)], input=json.dumps(req), capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LORAX_NPM_DIR": str(npm)})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    want = [tok(t)["input_ids"] for t in texts]
    print(f"\ntransformers.js: ids equal on {sum(g == w for g, w in zip(got['ids'], want, strict=True))}/{len(texts)} probes")
    assert got["ids"] == want
    renders = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    assert got["chat_texts"] == renders
    assert got["chat_ids"] == [tok(r, add_special_tokens=False)["input_ids"] for r in renders]
