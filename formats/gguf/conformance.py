"""Tokenizer conformance: the HF tokenizer and llama.cpp (on the written GGUF) must give identical ids.

    lorax export ADAPTER --out dist --gguf       (runs before any GGUF is moved into dist/)

The parity gate feeds both models the *same* ids, so it cannot see a tokenizer that splits text
differently; a user running the GGUF in llama.cpp would. This check tokenizes a probe set (ASCII,
Unicode, CJK, emoji, digits, whitespace runs, code, special tokens, chat-template renders) both ways,
with and without the tokenizer's own BOS/EOS, and fails on the first string that differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from formats.errors import FormatError
from formats.gguf.llama_log import capture_llama_log
from formats.gguf.tokenizer import CHKTXT

log = logging.getLogger(__name__)

PROBES: tuple[str, ...] = (
    "",
    "Hello world! This is a plain ASCII sentence, with punctuation: (a) [b] {c}?",
    "Grüße, naïve café — déjà vu; Ελληνικά; русский текст; ąęłńśźż",
    "東京は日本の首都です。我想在apple工作1314151天～ 한국어 텍스트",
    "Emoji: 🚀🦙 😶\u200d🌫️ ✅ 👍🏽 🇫🇷",
    "Digits: 3 33 333 3333 1234567890 3.14159 1,000,000 2024-11-28 x2y3",
    "Spaces:  two   three    four\n\nnewlines\n\n\n\ttabs\t\t end  ",
    "   leading spaces and trailing   ",
    "\n\nleading newlines\r\nand CRLF\r\n",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n    return -x\n",
    '{"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true}',
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea?",
    CHKTXT,
)

CONVERSATIONS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are concise."}, {"role": "user", "content": "Name a city."},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Another one, please 🙂"}],
)


@dataclass
class ConformanceReport:
    probes: int
    warnings: list[str] = field(default_factory=list)


def probe_texts(tok) -> list[tuple[str, bool]]:
    """(text, add_special) pairs: plain probes both ways, inline special tokens, chat renders without specials."""
    specials = [t for t in tok.all_special_tokens if t]
    # starts with plain text: a leading BOS plus add_bos would only repeat llama.cpp's double-BOS log line
    inline = "head" + "".join(f"{s}word {i} " for i, s in enumerate(specials)) + " tail"
    out = [(t, flag) for t in (*PROBES, inline) for flag in (True, False)]
    for conv in chat_renders(tok):
        out.append((conv, False))
    return out


def chat_renders(tok) -> list[str]:
    if not getattr(tok, "chat_template", None):
        return []
    out = []
    for conv in CONVERSATIONS:
        for gen in (True, False):
            try:
                out.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))
            except Exception as e:  # some templates reject a system role; the others still get checked
                log.debug("chat template rejected a probe conversation: %s", e)
    return out


def _window(ids: Sequence[int], i: int) -> str:
    lo = max(0, i - 8)
    return ("[…, " if lo else "[") + ", ".join(map(str, ids[lo:i + 24])) + (", …]" if len(ids) > i + 24 else "]")


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_tokenizer(hf_tokenizer, gguf_path: str | Path) -> ConformanceReport:
    """Raise FormatError on the first probe where HF and llama.cpp ids differ; return warnings otherwise."""
    from llama_cpp import Llama

    with capture_llama_log():
        llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        probes = probe_texts(hf_tokenizer)
        warnings: list[str] = []

        def llama_ids(text: str, add_special: bool) -> list[int]:
            return list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

        for text, add_special in probes:
            want = list(hf_tokenizer(text, add_special_tokens=add_special)["input_ids"])
            got = llama_ids(text, add_special)
            i = first_difference(want, got)
            if i is None:
                continue
            if _spm_leading_space(llm, text) and want == llama_ids(text[1:], add_special):
                if SPM_LEADING_SPACE not in warnings:
                    log.warning(SPM_LEADING_SPACE)
                    warnings.append(SPM_LEADING_SPACE)
                continue
            raise FormatError(
                f"tokenizer mismatch on {text[:80]!r} (add_special={add_special}) at token {i}: "
                f"HF {_window(want, i)} vs llama.cpp {_window(got, i)}; the GGUF would tokenize differently "
                "from the trained model (check tokenizer.ggml.pre, merges and special tokens)")
        warnings += double_bos_warnings(hf_tokenizer, llm._model.add_bos_token())
        return ConformanceReport(len(probes), warnings)
    finally:
        llm.close()


# The one difference no GGUF can remove, accepted only in exactly this form: SentencePiece (and llama.cpp)
# always prepend the "▁" space prefix; transformers' Metaspace skips it when the text already starts with a
# space. So HF(" x") == llama.cpp("x"); the check verifies that identity instead of skipping the probe.
SPM_LEADING_SPACE = ("SentencePiece space prefix: for text that starts with a space, transformers omits the "
                     "prefix llama.cpp adds, so such prompts get one more '▁' in llama.cpp than in training")


def _spm_leading_space(llm, text: str) -> bool:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    is_spm = llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
    return is_spm and text.startswith(" ") and llm.metadata.get("tokenizer.ggml.add_space_prefix") != "false"


def double_bos_warnings(hf_tokenizer, gguf_adds_bos: bool) -> list[str]:
    """Warn when the chat template writes BOS itself while the GGUF also asks llama.cpp to add one."""
    renders = chat_renders(hf_tokenizer)
    bos = hf_tokenizer.bos_token
    if not (renders and bos and gguf_adds_bos):
        return []
    if renders[0].startswith(bos):
        msg = (f"double BOS: the chat template starts with {bos!r} and the GGUF sets add_bos_token, so "
               "llama.cpp prompts rendered with this template will begin with two BOS tokens")
        log.warning(msg)
        return [msg]
    return []
