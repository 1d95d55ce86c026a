"""The demo task: turn a sentence about a person into a JSON object with fixed keys.

    python scripts/make_demo_data.py --out data/demo     # writes train.jsonl (300) and eval.jsonl (50)

Deterministic for a seed. The answer is canonical `json.dumps` of {"name", "age", "city", "job"}, so
the task metric is exact match. SmolLM2-135M-Instruct, asked zero-shot, answers with prose or other
keys and scores near 0; a few minutes of QLoRA teach it the format.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Maria", "Ahmed", "Yuki", "Lars", "Chloe", "Diego", "Priya", "Tomasz", "Amara", "Kenji", "Sofia",
         "Omar", "Elena", "Mateo", "Aisha", "Noah", "Ingrid", "Ravi", "Lucia", "Felix", "Hana", "Samuel",
         "Zara", "Viktor", "Mei", "Jonas", "Fatima", "Pablo", "Greta", "Kwame"]
CITIES = ["Lisbon", "Cairo", "Osaka", "Oslo", "Lyon", "Bogota", "Pune", "Krakow", "Lagos", "Kyoto", "Madrid",
          "Dubai", "Athens", "Lima", "Nairobi", "Boston", "Bergen", "Delhi", "Turin", "Vienna", "Seoul",
          "Accra", "Perth", "Prague", "Taipei", "Hamburg", "Tunis", "Quito", "Munich", "Kumasi"]
JOBS = ["teacher", "nurse", "engineer", "baker", "pilot", "lawyer", "chef", "painter", "farmer", "dentist",
        "architect", "librarian", "plumber", "journalist", "pharmacist", "electrician", "designer", "mechanic"]
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}: {age} years old, working as a {job} in {city}.",
    "In {city} there is a {job} named {name}, aged {age}.",
    "{name}, {age}, has worked as a {job} in {city} for years.",
    "The {job} {name} turned {age} this year and still lives in {city}.",
    "Born {age} years ago, {name} now works as a {job} in {city}.",
]
INSTRUCTION = 'Extract JSON with keys "name", "age", "city", "job" from: '


def example(rng: random.Random) -> dict:
    person = {"name": rng.choice(NAMES), "age": rng.randint(19, 79), "city": rng.choice(CITIES),
              "job": rng.choice(JOBS)}
    sentence = rng.choice(TEMPLATES).format(**person)
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                         {"role": "assistant", "content": json.dumps(person)}]}


def make(out_dir: str | Path, n_train: int = 300, n_eval: int = 50, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        ex = example(rng)
        key = ex["messages"][0]["content"]
        if key not in seen:  # held-out sentences never appear in training
            seen.add(key)
            rows.append(ex)
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:]), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--eval", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for p in make(a.out, a.train, a.eval, a.seed):
        print(p)
