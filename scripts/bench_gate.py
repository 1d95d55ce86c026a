"""Time the parity gate of an existing export, as `lorax export` runs it (same targets, floor and control).

    python scripts/bench_gate.py --adapter demo/adapter --dist demo/dist [--report-dir /tmp/gate] [--json out.json]
    python scripts/bench_gate.py --adapter demo/adapter --hand-loop demo/dist/model-q8_0.gguf --max-samples 8 \
        [--rounds 3]

Rebuilds the export's gate from dist/lorax.json (each artifact of kind model/base, the LoRA GGUF applied to
the base-as-trained GGUF) and runs it into --report-dir (never into dist/), printing the wall time, the
report's stage timings when it has them, the verdicts and the metrics, so two builds of lorax can be
compared on the same files: the metrics must agree and the time is the point.

--hand-loop GGUF times, in one process and on the same samples, what a user would check by hand (the PEFT
model on its 4-bit base, then the GGUF in llama-cpp-python: teacher-forced logits and 16 greedy tokens per
prompt, one prompt at a time) against `lorax check ADAPTER GGUF` computing its reference, and against a
second `lorax check` that reuses the stored reference outputs. The hand loop alone spread 35-47 s in one
session on one machine, as wide as the margin being measured: --rounds repeats the three and reports the
median ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def gate_targets(dist: Path) -> tuple[list, Path | None]:
    from exporter.gate.targets import open_target

    dist = dist.resolve()
    record = json.loads((dist / "lorax.json").read_text())
    kinds = {a["path"]: a["kind"] for a in record.get("artifacts", [])}
    lora = next((dist / p for p, k in kinds.items() if k == "lora"), None)
    paths = [Path(p) for p in record["gate"].get("artifacts", [])] or None
    if paths is None:  # a finished export lists its targets by name only: rebuild the list from artifacts
        paths = ([dist / "merged"] if (dist / "merged").is_dir() else [])
        paths += [dist / p for p, k in kinds.items() if k in ("model", "base") and p.endswith(".gguf")]
        paths += sorted((dist / "onnx" / "onnx").glob("model*.onnx"))
    return [open_target(p if p.is_absolute() else dist / p, lora if kinds.get(Path(p).name) == "base" else None)
            for p in paths], lora


def hand_loop(adapter: Path, gguf: Path, samples, gen_tokens: int = 16) -> float:
    """Seconds for the loop a user writes without lorax: the trained model, then the GGUF, prompt by prompt."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from peft import PeftModel

    from exporter.gate.reference import read_adapter
    from lorax_common import base_as_trained

    t0 = time.perf_counter()
    info = read_adapter(adapter)
    base = base_as_trained.load(info.base_dir, info.trained_on.quantization(), info.trained_on.load_dtype)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.inference_mode():
        for s in samples:
            model(torch.tensor([s.ids])).logits.float().numpy()
            model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=gen_tokens, do_sample=False)
    del model, base
    llm = Llama(str(gguf), n_ctx=2048, logits_all=True, verbose=False)
    for s in samples:
        llm.reset()
        llm.eval(s.ids)
        np.array(llm.scores[: len(s.ids)])
        llm.reset()
        llm.eval(s.prompt_ids)
        for _ in range(gen_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    llm.close()
    return time.perf_counter() - t0


def hand_round(args, samples) -> dict:
    """One round: the hand loop, then `lorax check` computing its reference into a fresh store, then a second
    check reusing it; wall times, ratios, and whether the two checks agree."""
    import os

    from exporter.export.gguf_build import merged_of_artifacts, recipes_of_artifacts
    from exporter.gate.check import GateOptions, check

    store = Path(tempfile.mkdtemp(prefix="lorax-bench-store-"))
    os.environ["LORAX_REFERENCE_CACHE"] = str(store)  # a fresh store: the first check computes, the second reuses
    hand = hand_loop(args.adapter, args.hand_loop, samples)
    # what `lorax check ADAPTER GGUF` derives from the export dir the GGUF sits in (exporter/cli/check.py)
    paths = [Path(args.hand_loop)]
    opts = GateOptions(floor="off", max_samples=args.max_samples, recipes=recipes_of_artifacts(paths),
                       merged_dir=merged_of_artifacts(Path(args.adapter), paths))
    times, reports = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        reports.append(check(args.adapter, [args.hand_loop], opts))
        times.append(time.perf_counter() - t0)
    return {"hand_loop_s": round(hand, 1), "check_s": round(times[0], 1), "check_reused_s": round(times[1], 1),
            "check_over_hand": round(times[0] / hand, 2), "reused_over_hand": round(times[1] / hand, 2),
            "same_metrics": reports[0].targets[0].metrics == reports[1].targets[0].metrics,
            "reused": reports[1].reference_path.get("outputs", {}).get("reused")}


def compare_with_hand_loop(args) -> None:
    """--rounds rounds in one process (the first pays cold file caches on both sides of its ratio, as a user's
    first run does); the medians of the ratios, not of the times, are the result."""
    import statistics

    from exporter.gate.reference import load_tokenizer, read_adapter
    from exporter.gate.samples import build, load_rows

    tok = load_tokenizer(read_adapter(args.adapter))
    samples = build(load_rows(None, args.adapter)[0], tok, max_samples=args.max_samples)
    rounds = [hand_round(args, samples) for _ in range(args.rounds)]
    out = {"samples": len(samples), **rounds[0]}
    if len(rounds) > 1:
        out = {"samples": len(samples), "rounds": rounds,
               **{f"median_{k}": statistics.median(r[k] for r in rounds) for k in ("check_over_hand",
                                                                                  "reused_over_hand")},
               "same_metrics": all(r["same_metrics"] for r in rounds), "reused": all(r["reused"] for r in rounds)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--dist", type=Path)
    ap.add_argument("--hand-loop", type=Path, metavar="GGUF", help="compare `lorax check` of this GGUF with a hand loop")
    ap.add_argument("--report-dir", type=Path)
    ap.add_argument("--max-samples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="with --hand-loop: rounds in a row, medians reported")
    ap.add_argument("--json", type=Path, help="write wall time, verdicts and metrics here")
    args = ap.parse_args()
    if args.hand_loop:
        compare_with_hand_loop(args)
        return
    if args.dist is None:
        ap.error("--dist is required without --hand-loop")

    from exporter.export.gguf_build import recipes_from_record
    from exporter.gate.check import GateOptions, check

    record = json.loads((args.dist / "lorax.json").read_text())
    targets, lora = gate_targets(args.dist)
    report_dir = args.report_dir or Path(tempfile.mkdtemp(prefix="lorax-bench-gate-"))
    opts = GateOptions(report_dir=report_dir, max_samples=args.max_samples, lora=lora, merged_dir=args.dist / "merged",
                       recipes=recipes_from_record(record, args.dist))
    t0 = time.perf_counter()
    report = check(args.adapter, targets, opts)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = {t.name: {"passed": t.passed, **{k: t.metrics.get(k) for k in ("kld_mean", "kld_p99", "top1",
                                                                          "greedy_match", "task_accuracy")}}
            for t in report.targets}
    out = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak), "passed": report.passed, "targets": rows,
           "timing": getattr(report, "timing", None)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
