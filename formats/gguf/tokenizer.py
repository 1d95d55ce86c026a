"""The tokenizer of an HF model directory as GGUF vocabulary metadata (byte-level BPE or SentencePiece).

    lorax export ADAPTER --out dist --gguf          (formats.gguf.writer embeds what `load_vocab` returns)

Merges, special-token ids and the chat template come from gguf-py's `SpecialVocab`. What it cannot know is
decided here: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) and whether the tokenizer adds BOS/EOS.
llama.cpp's own converter picks the pre-tokenizer by hashing the ids of a probe string, which only works for
vocabularies it has seen; a fine-tune's custom vocabulary needs the *structure* of tokenizer.json's
pre_tokenizer instead (as the loaded tokenizer runs it, which transformers may build differently from the
file), so that is tried first and the hash table is the fallback. add_bos/add_eos are
measured by running the HF tokenizer, not parsed from config files that may not say.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType

from formats.errors import FormatError
from formats.gguf.spm import spm_tokens
from lorax_common.files import check_tokenizer_files

# --------------------------------------------------------------------------- pre-tokenizer name tables

# HF pre_tokenizer structures (see `structure`) -> llama.cpp pre-tokenizer name. The regexes are the ones
# HF tokenizer.json files carry for these families (llama.cpp quotes them beside its own versions).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_BY_STRUCTURE: dict[tuple, str] = {
    ("ByteLevel", True, False): "gpt-2",
    ("Sequence", (("Digits", True), ("ByteLevel", True, False))): "smollm",
    ("Sequence", (("Split", _LLAMA3_RE, "Isolated", False), ("ByteLevel", False, False))): "llama-bpe",
    ("Sequence", (("Split", _QWEN2_RE, "Isolated", False), ("ByteLevel", False, False))): "qwen2",
}

# Fallback for known vocabularies: sha256 of str(ids of CHKTXT) -> pre name (values from llama.cpp's table).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_BY_HASH: dict[str, str] = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
}

# special-token kinds a causal LM's GGUF carries (llama.cpp reads no cls id; it does read mask, which Gemma has)
GGUF_SPECIALS = ("bos", "eos", "unk", "sep", "pad", "mask")

# llama.cpp's pre-tokenizer name for SentencePiece vocabularies (its SPM tokenizer has only the one)
SPM_PRE = "default"

# end-of-turn token texts of common chat formats; the one the chat template uses becomes tokenizer.ggml.eot
EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def structure(node: Mapping[str, Any] | None) -> tuple | None:
    """The parts of an HF pre_tokenizer that change how text is split, as a hashable tuple."""
    if node is None:
        return None
    kind = node.get("type")
    if kind == "Sequence":
        return ("Sequence", tuple(structure(n) for n in node.get("pretokenizers", [])))
    if kind == "ByteLevel":
        return ("ByteLevel", bool(node.get("use_regex", True)), bool(node.get("add_prefix_space", False)))
    if kind == "Digits":
        return ("Digits", bool(node.get("individual_digits", False)))
    if kind == "Split":
        pattern = node.get("pattern", {})
        return ("Split", pattern.get("Regex", pattern.get("String")), node.get("behavior"), node.get("invert"))
    return (kind, json.dumps(node, sort_keys=True))


def live_pre_tokenizer(tok, tokenizer_json: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pre-tokenizer the loaded HF tokenizer really runs. transformers 5 builds tokenizers per model_type
    (`Qwen2Tokenizer` for qwen2, with Qwen's split regex, even when tokenizer.json says plain ByteLevel), and
    the model was trained with what it built, not with the file."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tokenizer_json.get("pre_tokenizer")
    return json.loads(backend.to_str()).get("pre_tokenizer")


def pre_name(tokenizer_json: Mapping[str, Any], encode) -> str:
    """llama.cpp pre-tokenizer for a byte-level BPE tokenizer: by structure, else by vocabulary hash."""
    sig = structure(tokenizer_json.get("pre_tokenizer"))
    if sig in PRE_BY_STRUCTURE:
        return PRE_BY_STRUCTURE[sig]
    chkhsh = sha256(str(encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in PRE_BY_HASH:
        return PRE_BY_HASH[chkhsh]
    raise FormatError(
        f"unknown pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}; llama.cpp would split "
        f"text differently. Supported: {', '.join(sorted(set(PRE_BY_STRUCTURE.values())))}")


# --------------------------------------------------------------------------------------------- vocab


@dataclass
class Vocab:
    """Everything the GGUF tokenizer section holds."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    spm_flags: dict[str, bool] = field(default_factory=dict)  # add_space_prefix, remove_extra_whitespaces
    add_sep: bool | None = None  # only where the tokenizer files say (llama.cpp reads it for rerankers alone)
    rstrip: frozenset[int] = frozenset()  # added tokens that swallow the whitespace after them (formats.gguf.names)

    def add_to(self, w: GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_sep is not None:
            w.add_add_sep_token(self.add_sep)
        if "add_space_prefix" in self.spm_flags:
            w.add_add_space_prefix(self.spm_flags["add_space_prefix"])
        if "remove_extra_whitespaces" in self.spm_flags:
            w.add_remove_extra_whitespaces(self.spm_flags["remove_extra_whitespaces"])
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def load_hf_tokenizer(hf_dir: str | Path):
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    if not any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise FormatError(f"{hf_dir}: no tokenizer.json or tokenizer.model; copy the base model's tokenizer "
                          "files into it (the GGUF embeds the tokenizer)")
    check_tokenizer_files(hf_dir)  # a broken tokenizer.json: its name, not a bare JSONDecodeError
    return AutoTokenizer.from_pretrained(str(hf_dir))


def load_vocab(hf_dir: str | Path, vocab_size: int, hf_tokenizer=None) -> Vocab:
    """Read the tokenizer of `hf_dir` (tokenizer.model first, as llama.cpp does, else tokenizer.json)."""
    hf_dir = Path(hf_dir)
    tok = hf_tokenizer or load_hf_tokenizer(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
    if (hf_dir / "tokenizer.model").is_file():
        tokens, types, scores, spm_flags = spm_tokens(hf_dir / "tokenizer.model", tok.added_tokens_decoder, vocab_size)
        check_same_pieces(tokens, tj, hf_dir)
        _pad(tokens, types, vocab_size, scores)
        model, pre, merges = "llama", SPM_PRE, []
    elif tj.get("model", {}).get("type") == "BPE" and not tj["model"].get("byte_fallback"):
        tokens, types = _bpe_tokens(tj, vocab_size)
        scores, spm_flags, model = None, {}, "gpt2"
        pre = pre_name({"pre_tokenizer": live_pre_tokenizer(tok, tj)}, lambda text: tok.encode(text))
        merges = SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size).merges
    else:
        raise FormatError(f"{hf_dir}: no supported tokenizer; the GGUF writer needs tokenizer.json with a "
                          "byte-level BPE model or a SentencePiece tokenizer.model")
    special = SpecialVocab(hf_dir, load_merges=False, n_vocab=vocab_size)
    special_ids = {k: v for k, v in special.special_token_ids.items() if k in GGUF_SPECIALS}
    template = special.chat_template if isinstance(special.chat_template, str) else None
    if (eot := _eot_id(tokens, types, template)) is not None:
        special_ids["eot"] = eot
    add_bos, add_eos = measure_added_specials(tok)
    rstrip = frozenset(i for i, t in tok.added_tokens_decoder.items() if t.rstrip)
    return Vocab(model, pre, tokens, types, scores, merges, special_ids, add_bos, add_eos, template, spm_flags,
                 add_sep=special.add_special_token.get("sep"), rstrip=rstrip)


def _pad(tokens: list[str], types: list[int], vocab_size: int, scores: list[float] | None = None) -> None:
    """Rows of the embedding beyond the tokenizer get placeholder tokens, as llama.cpp expects."""
    if len(tokens) > vocab_size:
        raise FormatError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}; "
                          "resize the model's embeddings before exporting")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _bpe_tokens(tj: Mapping[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in tj["model"]["vocab"].items()}
    # Added tokens are stored as raw text (llama.cpp matches CONTROL/USER_DEFINED tokens before byte encoding).
    for added in tj.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id[i][0] if i in by_id else f"[PAD{i}]" for i in range(n)]
    types = [by_id[i][1] if i in by_id else TokenType.UNUSED for i in range(n)]
    _pad(tokens, types, vocab_size)
    return tokens, types


def check_same_pieces(tokens: list[str], tj: Mapping[str, Any], hf_dir: Path) -> None:
    """tokenizer.json (what transformers runs) must give every piece of tokenizer.model (what the GGUF holds) the
    same id; a tokenizer.model from elsewhere (the base's, beside an adapter's tokenizer.json) may not."""
    vocab = tj.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        return
    for i, piece in enumerate(tokens):
        if piece in vocab and vocab[piece] != i:
            raise FormatError(f"{hf_dir}: tokenizer.model has {piece!r} at id {i}, tokenizer.json at "
                              f"{vocab[piece]}; the two tokenizer files are from different models")


def _eot_id(tokens: list[str], types: list[int], template: str | None) -> int | None:
    if not template:
        return None
    for text in EOT_TEXTS:
        if text in template and text in tokens:
            i = tokens.index(text)
            if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED):
                return i
    return None


def measure_added_specials(tok) -> tuple[bool, bool]:
    """(add_bos, add_eos) as the HF tokenizer actually behaves on plain text."""
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            lead, trail = full[:start], full[start + len(plain):]
            break
    else:
        raise FormatError("the HF tokenizer changes the text ids when adding special tokens; llama.cpp cannot "
                          "reproduce that")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if lead not in ([], [bos]) or trail not in ([], [eos]):
        raise FormatError(f"the HF tokenizer adds {lead} before and {trail} after the text; llama.cpp can only "
                          "add BOS before and EOS after")
    return lead == [bos] and bos is not None, trail == [eos] and eos is not None
