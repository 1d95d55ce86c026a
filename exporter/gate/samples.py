"""Evaluation samples for the gate: the token ids every target is fed, plus prompt/answer for generation.

    lorax check adapter/ dist/*.gguf --prompts eval.jsonl

Prompts come in the training data's JSONL forms (messages, prompt/completion, text); chat records are
rendered with the reference tokenizer's chat template exactly as training rendered them. Without
--prompts the adapter's held-out `eval.jsonl` is used, else the built-in probe set below.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# Built-in probe set: prose, code, numbers, Unicode and a chat turn (~600 SmolLM2 tokens together).
PROBES: list[dict] = [
    {"text": "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
             "combined movable metal type, oil-based ink and a screw press adapted from wine making. Within "
             "fifty years presses were running in more than two hundred European cities, and the price of "
             "books fell so far that literacy, science and religious debate all changed in ways nobody had "
             "planned. Historians still argue about which of those changes mattered most."},
    {"text": "def fibonacci(n: int) -> list[int]:\n    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
             "    seq = [0, 1]\n    while len(seq) < n:\n        seq.append(seq[-1] + seq[-2])\n"
             "    return seq[:n]\n\nprint(fibonacci(12))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89]\n"},
    {"text": "Order #48213 shipped on 2024-03-17: 3 x widgets at $12.50, 1 x gadget at $199.99, total "
             "$237.49 incl. 7.5% tax. Café au lait, naïve façade, Grüße aus München, 東京タワー, 🚀✨."},
    {"messages": [{"role": "user", "content": "Give me two tips for writing clear commit messages."},
                  {"role": "assistant", "content": "1. Start with a short summary in the imperative mood. "
                   "2. In the body, explain why the change was made, not only what changed."}]},
    {"messages": [{"role": "user", "content": "What is the boiling point of water at sea level in Celsius?"},
                  {"role": "assistant", "content": "100 degrees Celsius."}]},
]


@dataclass
class Sample:
    text: str                     # the full rendered sequence (teacher-forced)
    ids: list[int]                # reference tokenizer ids of `text`
    prompt_ids: list[int]         # ids the model is prompted with for generation
    answer: str | None = None     # expected completion (for the task metric), if the record has one
    source: dict = field(default_factory=dict)
    # per id, whether training's loss scores it (train.data's rule: assistant turns with their end-of-turn
    # marker, completions); None: every token (plain text, a record training would not train on, or a
    # tokenizer without offsets). The gate's perplexity is taken over these tokens.
    scored: list[bool] | None = None


def render(row: dict, tokenizer) -> tuple[str, str, str | None]:
    """(full text, prompt text, answer) for one record, chat rendered with the tokenizer's template."""
    if "messages" in row:
        msgs = row["messages"]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if msgs and msgs[-1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            return full, prompt, msgs[-1]["content"]
        return full, full, None
    if "prompt" in row and "completion" in row:
        return row["prompt"] + row["completion"], row["prompt"], row["completion"]
    if "text" in row:
        return row["text"], row["text"], None
    raise ValueError(f"record has none of messages / prompt+completion / text: keys {sorted(row)}")


def load_rows(prompts: str | Path | None, adapter_dir: str | Path | None = None) -> tuple[list[dict], str]:
    """Rows from --prompts, else the adapter's eval.jsonl, else the built-in probes; and where from."""
    from train.data import load

    if prompts:
        return load(prompts).rows, str(prompts)
    if adapter_dir and (Path(adapter_dir) / "eval.jsonl").exists():
        path = Path(adapter_dir) / "eval.jsonl"
        return load(path).rows, str(path)
    return list(PROBES), "built-in probes"


def scored_tokens(row: dict, full: str, tokenizer, n: int) -> list[bool] | None:
    """Which of the first `n` ids of `full` training's loss scores (train.data.chat_segments and label_tokens,
    the very rule `lorax train` masks labels with), or None when that is every token.

    Why the gate needs it: a chat model never produces its prompt. Prompt tokens are read, not sampled, and
    a loss-masked fine-tune never fits them, so many sit deep in the reference's tail (SmolLM2 demo: the
    `<|im_start|>` that ends a user turn, words of the default system prompt, reference NLL 5-10), where a
    quantized file's logit noise moves the NLL by nats either way. Perplexity over them measured that
    noise, not the text the model writes."""
    from train.data import chat_segments, label_tokens
    from train.errors import TrainError

    if "messages" in row:
        try:
            _, spans = chat_segments(row["messages"], tokenizer)
        except TrainError:
            return None  # the template renders a turn differently from its prefix: training refused it too
    elif "prompt" in row and "completion" in row:
        spans = [(len(row["prompt"]), len(full) + 1)]
    else:
        return None
    if not spans:
        return None
    try:
        offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except NotImplementedError:  # a slow (python) tokenizer has no offsets
        return None
    mask = label_tokens(list(offsets), spans)[:n]
    return mask if any(mask[1:]) else None  # the first id is never predicted


def build(rows: list[dict], tokenizer, max_samples: int | None = None, max_len: int = 1024) -> list[Sample]:
    # Special tokens come from the rendered text itself (chat templates write BOS/<|im_start|>), so do
    # not let the tokenizer add another BOS on top.
    out = []
    for row in rows[:max_samples]:
        full, prompt, answer = render(row, tokenizer)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_len]
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:max_len]
        if len(ids) < 2:
            continue
        out.append(Sample(text=full, ids=list(ids), prompt_ids=list(p_ids), answer=answer, source=row,
                          scored=scored_tokens(row, full, tokenizer, len(ids))))
    if not out:
        raise ValueError("no usable prompts (every record rendered to fewer than 2 tokens)")
    return out


def fingerprint(samples: list[Sample]) -> str:
    """Hash of the exact token ids: a baseline made on other prompts or another tokenizer won't match."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.ids).encode())
    return h.hexdigest()
