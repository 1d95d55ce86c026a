"""Training data: read records, split off eval, and turn each record into input ids + labels.

    lorax train --data train.jsonl [--eval-data eval.jsonl | --eval-fraction 0.1] --max-seq-len 512

Three record forms (one per file), as TRL names them:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
    {"prompt": "...", "completion": "..."}
    {"text": "..."}
Chat records are rendered with the tokenizer's own chat template, and the prompt part is tokenized
exactly as `apply_chat_template(..., add_generation_prompt=True)` tokenizes it at inference. Loss is
taken only on what the model should produce: assistant turns (including their end-of-turn token) and
completions; prompt tokens carry label -100. Plain text is trained on every token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.errors import TrainError

IGNORE = -100  # label the loss ignores (torch CrossEntropyLoss ignore_index)

# format -> keys that identify it; checked in this order
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Records:
    rows: list[dict[str, Any]]
    format: str
    source: str  # file or dir they came from


def _check_messages(r: dict) -> str | None:
    msgs = r["messages"]
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"messages[{i}] needs a role ({'/'.join(ROLES)}) and a string content"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message to learn from"
    return None


def _check_prompt_completion(r: dict) -> str | None:
    if not isinstance(r["prompt"], str) or not isinstance(r["completion"], str) or not r["completion"]:
        return "'prompt' and 'completion' must be strings and the completion non-empty"
    return None


def _check_text(r: dict) -> str | None:
    return None if isinstance(r["text"], str) and r["text"] else "'text' must be a non-empty string"


CHECKS: dict[str, Callable[[dict], str | None]] = {
    "messages": _check_messages,
    "prompt_completion": _check_prompt_completion,
    "text": _check_text,
}


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    return next((f for f, keys in FORMATS.items() if all(k in row for k in keys)), None)


def validate(rows: Iterable[tuple[str, Any]], source: str) -> Records:
    """Check every (location, row): one known form, the same form throughout. Errors name the location."""
    out: list[dict] = []
    fmt: str | None = None
    for where, row in rows:
        f = detect_format(row)
        if f is None:
            raise TrainError(f"{where}: expected a JSON object with 'messages', 'prompt'+'completion' or 'text'; "
                             "fix or remove that record")
        if fmt is not None and f != fmt:
            raise TrainError(f"{where}: record is '{f}' but earlier records are '{fmt}'; use one form per file")
        fmt = f
        problem = CHECKS[f](row)
        if problem:
            raise TrainError(f"{where}: {problem}; fix or remove that record")
        out.append({k: row[k] for k in FORMATS[f]})
    if not out:
        raise TrainError(f"{source}: no training records found; add JSONL lines ({{\"messages\": [...]}} etc.)")
    return Records(out, fmt, source)  # type: ignore[arg-type]


def _jsonl_rows(path: Path):
    with open(path, "rb") as fh:  # decoded per line, so a bad byte is reported with its line number
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TrainError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line") from None


def load(path: str | Path, split: str = "train") -> Records:
    """Records from a JSONL file, or from a `datasets` dir (`save_to_disk`; a DatasetDict uses `split`)."""
    path = Path(path)
    if not path.exists():
        raise TrainError(f"data {path} not found; check --data / --eval-data")
    if path.is_file():
        return validate(_jsonl_rows(path), str(path))
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise TrainError(f"{path} is a directory but not a dataset saved with save_to_disk; pass a JSONL file") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise TrainError(f"{path}: dataset has splits {sorted(ds)} but no '{split}'; save a '{split}' split")
        ds = ds[split]
    return validate(((f"{path}[row {i}]", row) for i, row in enumerate(ds)), str(path))


def split_eval(records: Records, fraction: float, seed: int) -> tuple[Records, Records | None]:
    """Hold out round(n * fraction) records (at least 1), chosen by `seed`; the rest keep their order."""
    if fraction <= 0:
        return records, None
    if not 0 < fraction < 1:
        raise TrainError(f"eval_fraction must be in [0, 1), got {fraction}")
    n = len(records.rows)
    if n < 2:
        raise TrainError(f"{records.source}: {n} record cannot be split into train and eval; "
                         "add data, pass --eval-data, or set --eval-fraction 0")
    n_eval = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [r for i, r in enumerate(records.rows) if i not in held]
    evals = [r for i, r in enumerate(records.rows) if i in held]
    return Records(train, records.format, records.source), Records(evals, records.format, records.source)


def write_jsonl(records: Records, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records.rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---- tokenization -------------------------------------------------------------------------------

def chat_segments(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of each assistant turn.

    A turn's span starts where the template's generation prompt ends (the inference prompt is a
    prefix of the full text) and ends where the rendered turn ends, so it includes the template's
    end-of-turn marker: the model learns to stop.
    """
    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(prompt) and full.startswith(upto) and len(upto) > len(prompt)):
            raise TrainError("the chat template renders a conversation differently from its prefixes, so prompt "
                             "tokens cannot be masked; use prompt/completion records for this model")
        spans.append((len(prompt), len(upto)))
    return full, spans


def label_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens are trained on: those whose first character lies in a span (pure)."""
    return [any(a <= start < b for a, b in spans) and end > start for start, end in offsets]


def encode(row: dict, fmt: str, tokenizer, max_len: int) -> dict[str, Any]:
    """input_ids, labels (-100 on prompt tokens), and whether the example was truncated."""
    eos = tokenizer.eos_token_id
    if fmt == "messages":
        text, spans = chat_segments(row["messages"], tokenizer)
        special = False  # the template writes its own special tokens, as apply_chat_template(tokenize=True) does
        add_eos = False
    elif fmt == "prompt_completion":
        text, spans, special, add_eos = row["prompt"] + row["completion"], [(len(row["prompt"]), 10**12)], True, True
    else:
        text, spans, special, add_eos = row["text"], [(0, 10**12)], True, True
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    train = label_tokens(enc["offset_mapping"], spans)
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        # a completion must end the way generation stops, or the model never learns to stop
        ids.append(eos)
        train.append(True)
    truncated = len(ids) > max_len
    ids, train = ids[:max_len], train[:max_len]
    labels = [t if keep else IGNORE for t, keep in zip(ids, train, strict=True)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": truncated}


@dataclass
class Encoded:
    dataset: Any  # datasets.Dataset with input_ids / attention_mask / labels
    truncated: int  # examples cut at max_seq_len
    dropped: int  # of those, examples with no trainable token left (removed)
    tokens: int  # total tokens kept


def tokenize(records: Records, tokenizer, max_len: int, desc: str = "tokenize") -> Encoded:
    import datasets

    from lorax_common.log import progress

    if records.format == "messages" and not getattr(tokenizer, "chat_template", None):
        raise TrainError("chat records need a tokenizer chat template but the base has none; "
                         "use prompt/completion records or a base model with a chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise TrainError("prompt masking needs a fast (Rust) tokenizer with offsets; the base's tokenizer is not fast")
    rows = [encode(r, records.format, tokenizer, max_len) for r in progress(records.rows, desc=desc, leave=False)]
    truncated = sum(r["truncated"] for r in rows)
    kept = [r for r in rows if any(lab != IGNORE for lab in r["labels"])]
    for r in kept:
        del r["truncated"]
    ds = datasets.Dataset.from_list(kept) if kept else None
    if ds is None:
        raise TrainError(f"{records.source}: no example has a trainable token within max_seq_len={max_len}; "
                         "raise --max-seq-len or shorten the prompts")
    return Encoded(ds, truncated, len(rows) - len(kept), sum(len(r["input_ids"]) for r in kept))
