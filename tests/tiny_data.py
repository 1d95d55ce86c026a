"""Tiny training sets for `lorax train` tests: a learnable chat task in each record form.

The task (city -> fixed fact) is a deterministic function of the prompt, so a tiny model's eval
loss on held-out records falls within a few dozen steps. Words come from the tiny tokenizer's
training corpus, so they tokenize into few tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

CITIES = ["Paris", "Berlin", "Tokyo", "Lima"]
COLORS = ["red", "green", "blue", "red"]
QUESTIONS = ["What color is {c}?", "Name the color of {c}.", "Which color has {c}?", "Color of {c}, one word."]


def chat_records(n: int = 64) -> list[dict]:
    out = []
    for i in range(n):
        c = i % len(CITIES)
        q = QUESTIONS[(i // len(CITIES)) % len(QUESTIONS)].format(c=CITIES[c])
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"The color is {COLORS[c]}."}]
        if i % 8 == 7:  # some two-turn conversations: both assistant turns are trained on
            msgs += [{"role": "user", "content": "And the number?"}, {"role": "assistant", "content": f"Number {c + 1}."}]
        out.append({"messages": msgs})
    return out


def prompt_completion_records(n: int = 32) -> list[dict]:
    return [{"prompt": f"City {CITIES[i % 4]} color:", "completion": f" {COLORS[i % 4]}"} for i in range(n)]


def text_records(n: int = 32) -> list[dict]:
    return [{"text": f"The city {CITIES[i % 4]} has color {COLORS[i % 4]}."} for i in range(n)]


def write_jsonl(rows: list, path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
