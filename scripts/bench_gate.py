"""Time the parity gate of an existing export, as `lorax export` runs it (same targets, floor and control).

    python scripts/bench_gate.py --adapter demo/adapter --dist demo/dist [--report-dir /tmp/gate] [--json out.json]

Rebuilds the export's gate from dist/lorax.json (each artifact of kind model/base, the LoRA GGUF applied to
the base-as-trained GGUF) and runs it into --report-dir (never into dist/), printing the wall time, the
report's stage timings when it has them, the verdicts and the metrics, so two builds of lorax can be
compared on the same files: the metrics must agree and the time is the point.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--dist", required=True, type=Path)
    ap.add_argument("--report-dir", type=Path)
    ap.add_argument("--max-samples", type=int, default=16)
    ap.add_argument("--json", type=Path, help="write wall time, verdicts and metrics here")
    args = ap.parse_args()

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
