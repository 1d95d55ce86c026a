"""A SentencePiece tokenizer (tokenizer.model: Llama 2, Gemma 3) as GGUF vocabulary arrays.

    lorax export ADAPTER --out dist --gguf          (formats.gguf.tokenizer.load_vocab calls spm_tokens)

The pieces, their scores and SentencePiece types come from the model proto. Added tokens are then typed as
transformers built them (its live tokenizer's `added_tokens_decoder`, not a config file that may be missing):
a special one is CONTROL, any other USER_DEFINED, both with llama.cpp's score for added tokens (-1000), as
llama.cpp's converter writes them for a Gemma 3 or Llama 2 directory. llama.cpp matches CONTROL and
USER_DEFINED tokens in the raw text before the SentencePiece merges, as transformers matches added tokens.

One deliberate difference from llama.cpp's converter: it stores a non-special added token containing "▁"
(Gemma's "▁▁" whitespace piece) with "▁" turned into spaces. llama.cpp then no longer finds the token in text
that spells "▁▁" literally, which transformers does (tests/test_gemma3_tokenizer.py measures both); keeping the
piece and its SentencePiece score makes llama.cpp reach it through the merges in the same places as transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf import TokenType

from formats.errors import FormatError

# sentencepiece ModelProto.SentencePiece.Type -> GGUF token type
SPM_TYPES = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 4: TokenType.USER_DEFINED,
             5: TokenType.UNUSED, 6: TokenType.BYTE}

# llama.cpp's score for added tokens (and for [PAD] rows)
ADDED_SCORE = -1000.0

# added tokens llama.cpp's converter makes CONTROL even where transformers calls them plain (Gemma's
# "<mask>", "[@BOS@]" and "<unusedN>"): (exact names, (prefix, suffix) patterns)
LOOKS_SPECIAL = ({"<pad>", "<mask>", "<2mass>", "[@BOS@]"}, (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">")))

SPACE = "▁"


def looks_special(text: str) -> bool:
    names, patterns = LOOKS_SPECIAL
    return text in names or any(text.startswith(a) and text.endswith(b) for a, b in patterns)


def added_type(content: str, special: bool) -> TokenType:
    return TokenType.CONTROL if special or looks_special(content) else TokenType.USER_DEFINED


def keeps_spm_score(content: str, special: bool) -> bool:
    """A plain added token spelled with "▁" is reached through the merges (see the module doc): its
    SentencePiece score, not the added-token score, decides when llama.cpp merges it."""
    return not special and SPACE in content and added_type(content, special) == TokenType.USER_DEFINED


def spm_tokens(model_file: Path, added: Mapping[int, Any], vocab_size: int
               ) -> tuple[list[str], list[int], list[float], dict[str, bool]]:
    """(tokens, types, scores, normalizer flags) for a tokenizer.model plus the tokenizer's added tokens
    (`added`: id -> object with .content and .special, as transformers' `added_tokens_decoder`)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise FormatError(f"{model_file}: not a SentencePiece model ({e}); copy the base model's "
                          "tokenizer.model") from e
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(SPM_TYPES.get(p.type, TokenType.NORMAL)) for p in proto.pieces]
    for tid in sorted(added):
        content, special = added[tid].content, bool(added[tid].special)
        if tid > len(tokens):
            raise FormatError(f"added token {content!r} has id {tid}, expected at most {len(tokens)}: added "
                              "tokens must follow the SentencePiece vocabulary without gaps")
        if tid == len(tokens):
            tokens.append(content)
            scores.append(ADDED_SCORE)
            types.append(int(added_type(content, special)))
            continue
        tokens[tid] = content  # a repurposed piece (an <unused> slot renamed) reads as transformers reads it
        types[tid] = int(added_type(content, special))
        if not keeps_spm_score(content, special):
            scores[tid] = ADDED_SCORE
    flags = {"add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
             "remove_extra_whitespaces": bool(proto.normalizer_spec.remove_extra_whitespaces)}
    return tokens, types, scores, flags
