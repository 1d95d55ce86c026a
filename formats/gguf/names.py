"""general.name as llama.cpp reads it: a name can change how llama.cpp tokenizes, so lorax picks it.

    lorax export ADAPTER --out dist --gguf          (formats.gguf.writer names every model GGUF through gguf_name)

llama.cpp sets token attributes from general.name (llama-vocab.cpp, lowercased): a name containing "phi3" or
"phi-3" makes it strip the whitespace right of every special token (as Phi-3's tokenizer.json does with
rstrip) except <unk>, <s> and <|endoftext|>, and it looks up "</s>", "<unk>", "<s>" and "<|endoftext|>" by
text, so a vocabulary without one of them no longer loads at all. lorax's default name is the model's
folder name, and the base of a Phi-3.5 fine-tune is typically called "Phi-3.5-mini-instruct".

So the name is chosen from the tokenizer, not left to the folder: the Phi-3 rule is switched on exactly when
the tokenizer transformers built rstrips those tokens (" phi3" is appended if the name lacks it) and off
otherwise (the name's "phi3"/"phi-3" is written "Phi 3"). tests/test_gguf_names.py shows both directions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass

from gguf import TokenType

log = logging.getLogger(__name__)

# the types llama.cpp keeps in its special-token cache, the tokens a name rule applies to
CACHED_TYPES = frozenset({TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN})


@dataclass(frozen=True)
class NameRule:
    """One of llama.cpp's general.name rules: the name pattern and the rstrip behaviour it turns on."""

    pattern: re.Pattern[str]  # what llama.cpp finds in the lowercased name
    needs: tuple[str, ...]  # tokens llama.cpp looks up by text once the rule is on (load fails without them)
    not_rstrip: tuple[str, ...]  # cached tokens the rule leaves without rstrip; all other cached ones rstrip
    neutral: str  # how a name that must not trigger the rule spells the match
    tag: str  # appended to a name that must trigger it


RULES: tuple[NameRule, ...] = (
    NameRule(re.compile(r"phi-?3", re.IGNORECASE), ("</s>", "<unk>", "<s>", "<|endoftext|>"),
             ("<unk>", "<s>", "<|endoftext|>"), "Phi 3", " phi3"),
)


def rule_fits(rule: NameRule, tokens: list[str], types: list[int], rstrip: Collection[int]) -> bool:
    """Whether llama.cpp with `rule` on strips after exactly the tokens the HF tokenizer strips after
    (`rstrip`: ids of added tokens with rstrip=True); only tokens in llama.cpp's special cache can strip."""
    present = set(tokens)
    if not all(t in present for t in rule.needs):
        return False
    cached = [i for i, kind in enumerate(types) if kind in CACHED_TYPES]
    return {i for i in cached if tokens[i] not in rule.not_rstrip} == {i for i in cached if i in rstrip}


def gguf_name(requested: str, tokens: list[str], types: list[int], rstrip: Collection[int]) -> str:
    """`requested`, changed only as far as needed for llama.cpp's name rules to match the tokenizer."""
    name = requested
    for rule in RULES:
        on = bool(rule.pattern.search(name))
        want = rule_fits(rule, tokens, types, rstrip)
        if on and not want:
            name = rule.pattern.sub(rule.neutral, name)
        elif want and not on:
            name = name + rule.tag
    if name != requested:
        log.info("general.name %r written as %r: llama.cpp tokenizes by the name (formats/gguf/names.py)",
                 requested, name)
    return name
