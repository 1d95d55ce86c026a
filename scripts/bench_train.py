"""Throughput of `lorax train` against a plain PEFT + Trainer script, side by side in one run.

    .venv/bin/python scripts/bench_train.py                    # SmolLM2-135M, QLoRA NF4, 50 steps each
    .venv/bin/python scripts/bench_train.py --steps 10 --repeats 2

Both sides get the same synthetic chat data, the same base (the imported SmolLM2 HF dir), the same
settings (NF4 + double quant, float32 compute, r=16/alpha=32 all-linear, batch 4, lr 2e-4, adamw_torch,
checkpoint every 50 steps, no eval) and run in fresh processes, one after the other. Tokens/s is
non-padding tokens seen by the Trainer divided by the Trainer's own `train_runtime`, on both sides.
The plain side (`--plain`, below) imports nothing from lorax: it is the script a user would write.
With --repeats 2 the order is plain, lorax, lorax, plain (so drift of a shared machine cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TOPICS = ["rivers", "volcanoes", "bread", "bicycles", "libraries", "owls", "tides", "glass", "maps", "bees",
          "clocks", "salt", "kites", "moss", "bridges", "ink"]
ANGLES = ["Explain in two sentences how {t} work.", "Give me one surprising fact about {t}.",
          "Why do people care about {t}?", "Describe {t} to a child."]


def records(n: int) -> list[dict]:
    """Single-turn chats (so both sides' prompt masking sees identical tokens), ~60-110 tokens each."""
    out = []
    for i in range(n):
        t, a = TOPICS[i % len(TOPICS)], ANGLES[(i // len(TOPICS)) % len(ANGLES)]
        answer = (f"{t.capitalize()} are a good example of how simple rules add up. Fact number {i}: {t} "
                  f"change slowly, and people who study {t} keep careful notes about them.")
        out.append({"messages": [{"role": "user", "content": a.format(t=t)},
                                 {"role": "assistant", "content": answer}]})
    return out


# ---- the plain peer: what a user writes with PEFT + Trainer (no lorax imports) ------------------

def plain(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    tok = AutoTokenizer.from_pretrained(args.base)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]

    def encode(msgs):
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
        full = list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])[: args.max_seq_len]
        labels = [-100] * len(prompt) + full[len(prompt):]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels[: len(full)]}

    ds = Dataset.from_list([encode(r["messages"]) for r in rows])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=bnb, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4,
                              learning_rate=2e-4, optim="adamw_torch", logging_steps=10, save_steps=50, seed=0,
                              use_cpu=True, report_to="none", include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=targs, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    result = trainer.train()
    model.save_pretrained(Path(args.out) / "adapter")
    return {"tokens": trainer.state.num_input_tokens_seen, "runtime_s": result.metrics["train_runtime"],
            "steps": trainer.state.global_step, "adapter": str(Path(args.out) / "adapter")}


# ---- the two runs ----------------------------------------------------------------------------------

def run_plain(base: Path, data: Path, work: Path, steps: int, max_len: int) -> dict:
    out = tempfile.mkdtemp(dir=work, prefix="plain-")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--plain", "--base", str(base), "--data", str(data),
                           "--out", out, "--steps", str(steps), "--max-seq-len", str(max_len)],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"plain run failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def adapter_gap(a: str, b: str) -> float:
    """max |difference| between two adapters' tensors: 0 means both sides computed the same training."""
    from safetensors.torch import load_file

    ta, tb = load_file(Path(a) / "adapter_model.safetensors"), load_file(Path(b) / "adapter_model.safetensors")
    if ta.keys() != tb.keys():
        return float("inf")
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def run_lorax(base: Path, data: Path, work: Path, steps: int, max_len: int) -> dict:
    out = Path(tempfile.mkdtemp(dir=work, prefix="lorax-")) / "adapter"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "train", "--base", str(base), "--data", str(data),
                           "--out", str(out), "--max-steps", str(steps), "--batch-size", "4", "--rank", "16",
                           "--alpha", "32", "--lr", "2e-4", "--max-seq-len", str(max_len), "--eval-fraction", "0",
                           "--save-steps", "50", "--logging-steps", "10", "--quant", "nf4", "--double-quant"],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"lorax train failed:\n{proc.stderr[-3000:]}")
    rec = json.loads((out / "lorax.json").read_text())
    return {"tokens": rec["training"]["tokens_seen"], "runtime_s": rec["metrics"]["trainer_runtime_s"],
            "steps": rec["training"]["steps_done"], "wall_s": wall, "adapter": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs (order alternates)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--base", type=Path, default=None, help="HF dir (default: the imported SmolLM2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/torch threads for both sides (on a busy shared box 1 thread is steadier)")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain(args)))
        return

    if args.base is None:
        sys.path.insert(0, str(REPO))
        from default_model import hf_dir

        args.base = hf_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both subprocesses alike
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        data = work / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records(args.steps * 4)))
        runs: dict[str, list[dict]] = {"plain": [], "lorax": []}
        order = [("plain", "lorax"), ("lorax", "plain")]
        for i in range(args.repeats):
            for side in order[i % 2]:
                fn = run_plain if side == "plain" else run_lorax
                r = fn(args.base, data, work, args.steps, args.max_seq_len)
                r["tok_s"] = r["tokens"] / r["runtime_s"]
                runs[side].append(r)
                print(f"  {side:5s} run {i + 1}: {r['steps']} steps, {r['tokens']} tokens in {r['runtime_s']:.1f} s "
                      f"= {r['tok_s']:.1f} tok/s (process wall {r['wall_s']:.1f} s)", flush=True)
        # like for like: same tokens, and (same seed, data order, settings) the same trained adapter
        gap = adapter_gap(runs["plain"][0]["adapter"], runs["lorax"][0]["adapter"])

    if {r["tokens"] for rs in runs.values() for r in rs} != {runs["plain"][0]["tokens"]}:
        print("  warning: the two sides saw different token counts; the comparison is not like for like")
    print(f"  adapters of the two sides: max |difference| {gap:.3g} (0 = identical training computed)")
    med = {side: statistics.median(r["tok_s"] for r in rs) for side, rs in runs.items()}
    wall = {side: statistics.median(r["wall_s"] for r in rs) for side, rs in runs.items()}
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"model {args.base.name}, QLoRA NF4 fp32 compute, {args.steps} steps x batch 4, {os.cpu_count()} CPUs, "
          f"threads {threads}, load average {os.getloadavg()[0]:.1f}")
    print(f"plain PEFT+Trainer: {med['plain']:.1f} tok/s   lorax train: {med['lorax']:.1f} tok/s   "
          f"ratio lorax/plain: {med['lorax'] / med['plain']:.3f}")
    print(f"process wall (load + tokenize + train + save): plain {wall['plain']:.1f} s, lorax {wall['lorax']:.1f} s, "
          f"ratio {wall['plain'] / wall['lorax']:.3f} (plain/lorax, higher is better for lorax)")


if __name__ == "__main__":
    main()
