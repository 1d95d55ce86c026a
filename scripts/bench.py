"""`make bench`: every benchmark side by side with the peer tool, written to docs/BENCHMARKS.md.

    python scripts/bench.py [--only merge,gguf,onnx,quant,export,check,train] [--quick]

Each script measures lorax and its peer in the same run (fresh processes, same inputs) and prints its
ratios; this runner records the machine, the command, and each script's own summary. No absolute
number stands alone: read the ratio columns.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (script, full-run args, quick-run args, what it compares)
BENCHES: dict[str, tuple[str, list[str], list[str], str]] = {
    "merge": ("bench_merge.py", [], ["--size", "small"],
              "lorax merge vs PEFT load + merge_and_unload + save_pretrained (~1B Llama, rank-16 adapter)"),
    "gguf": ("bench_gguf.py", [], ["--skip-quality"],
             "lorax GGUF writer vs llama.cpp convert_hf_to_gguf.py (f16, same merged model)"),
    "onnx": ("bench_onnx.py", [], ["--quick"],
             "ONNX (float32, KV cache) decode in onnxruntime vs PyTorch eager generate (merged SmolLM2)"),
    # the demo's fine-tune (`make demo` writes out/demo/adapter and out/demo/dist/merged)
    "quant": ("bench_quant.py", ["--sweep"], ["--max-samples", "24"],
              "GGUF quantization per type: plain libllama vs lorax's importance matrix / tensor types (demo fine-tune)"),
    "export": ("bench_export.py", [], ["--samples", "4"],
               "lorax export --gguf --quant q4_k_m with its gate vs PEFT merge + convert_hf_to_gguf + "
               "llama_model_quantize, no check (1.18B)"),
    "check": ("bench_gate.py", ["--adapter", "out/demo/adapter", "--hand-loop", "out/demo/dist/model-q8_0.gguf",
                                "--max-samples", "8", "--rounds", "3"],
              ["--adapter", "out/demo/adapter", "--hand-loop", "out/demo/dist/model-q8_0.gguf", "--max-samples", "4"],
              "lorax check of one GGUF (fresh, then reusing the stored reference) vs a hand-written loop "
              "(demo fine-tune)"),
    "train": ("bench_train.py", [], ["--steps", "10"],
              "lorax train vs a plain PEFT + Trainer script (SmolLM2 QLoRA NF4, same settings)"),
}


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--quick", action="store_true", help="smaller models / fewer steps")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    sections, failed = [], []
    for name in args.only.split(","):
        script, full, quick, what = BENCHES[name]
        cmd = [sys.executable, str(ROOT / "scripts" / script), *(quick if args.quick else full)]
        shown = "python scripts/" + " ".join([script, *(quick if args.quick else full)])
        print(f"==> {name}: {shown}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        print(tail, flush=True)
        if proc.returncode != 0:
            failed.append(name)
            tail += f"\n\n(exit code {proc.returncode}; stderr tail)\n{proc.stderr.strip()[-1500:]}"
        sections.append(f"## {name}: {what}\n\nReproduce: `{shown}` ({secs:.0f} s)\n\n```\n{tail}\n```\n")
    header = (f"# lorax benchmarks\n\nMeasured {date.today().isoformat()} by `make bench` on: {machine()}.\n"
              "Every figure below is lorax and its peer measured side by side in the same run; read the ratios.\n"
              "The machine is shared and noisy: rerun before quoting.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(sections))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
