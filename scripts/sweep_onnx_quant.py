"""Every ONNX weight-quantization setting side by side: decode tok/s, KLD and top-1 vs the float32 graph.

    python scripts/sweep_onnx_quant.py                         # SmolLM2 (imported base), all SETTINGS
    python scripts/sweep_onnx_quant.py --onnx dist/onnx --adapter adapter/ --settings int4 int4-ort-rtn
                                                               # a fine-tune: dist/merged's float32 graph,
                                                               # the adapter's training rows as calibration

Settings are formats/onnx/quantize.py's SETTINGS. Each quantized graph is built once from the export's
float32 graph (cached beside it under ~/.cache/lorax/bench/sweep; `--adapter` gives the importance matrix
from the fine-tune's training rows, as `lorax export` computes it); then all of them and the float32
graph load in this one process and take turns, round by round (order reversed every other round), so a
shared machine's drift hits every setting alike. tok/s = median over rounds of cached greedy decode
(prefill excluded). Quality: teacher-forced logits on three chat prompts and one paragraph against the
float32 graph (which matches transformers to 1e-5), plus greedy tokens equal to float32's on the chats.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "Explain in two sentences why the sky is blue."]
TEXT = ("The history of the bicycle spans more than two centuries. Early designs had no pedals: riders pushed "
        "themselves along with their feet. Pedals attached to the front wheel came next, and then the chain drive "
        "moved the rider closer to the ground, which made cycling safer and far more popular.")


def importance(hf_dir: Path, adapter: Path | None) -> dict | None:
    """HF weight name -> mean x² per input column on the adapter's training rows (None without an adapter)."""
    if adapter is None:
        return None
    from transformers import AutoTokenizer

    from exporter.export.calibration import calibration_sequences
    from formats.gguf.imatrix import collect_imatrix, hf_importance

    cal = calibration_sequences(adapter, AutoTokenizer.from_pretrained(hf_dir))
    return hf_importance(collect_imatrix(hf_dir, cal.sequences, progress=False), hf_dir)


def calibration(hf_dir: Path, adapter: Path | None) -> list[list[int]] | None:
    """The adapter's training rows as token ids (GPTQ's calibration, as `lorax export` renders them)."""
    if adapter is None:
        return None
    from transformers import AutoTokenizer

    from exporter.export.calibration import calibration_sequences

    return calibration_sequences(adapter, AutoTokenizer.from_pretrained(hf_dir)).sequences


def build(src_root: Path, work: Path, names: list[str], hf_dir: Path, adapter: Path | None) -> dict[str, Path]:
    """work/onnx/<name>.onnx for each setting (side files copied so each graph opens like an export)."""
    from formats.onnx.bundle import graph_path
    from formats.onnx.quantize import quantize, wants_calibration

    (work / "onnx").mkdir(parents=True, exist_ok=True)
    for p in src_root.iterdir():
        if p.is_file():
            shutil.copy2(p, work / p.name)
    out, imp = {}, []
    for name in names:
        dest = work / "onnx" / f"{name}.onnx"
        if not dest.is_file():
            if not imp:
                imp.append(importance(hf_dir, adapter))
            t = time.perf_counter()
            quantize(graph_path(src_root, "float32"), dest, name, hf_dir, importance=imp[0],
                     calibration=calibration(hf_dir, adapter) if wants_calibration(name) else None)
            print(f"  built {name} in {time.perf_counter() - t:.0f} s", flush=True)
        out[name] = dest
    return out


def main() -> int:
    from formats.onnx.quantize import SETTINGS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, help="float32 export dir (default: SmolLM2's, built once and cached)")
    ap.add_argument("--model", type=Path, help="the HF dir the export came from (default: its lorax.json source)")
    ap.add_argument("--adapter", type=Path, help="the fine-tune's adapter: its training rows calibrate")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from exporter.gate.metrics import compare
    from formats.onnx.runner import ONNXRunner

    if args.onnx is None:
        from bench_onnx import cached_export
        from default_model import hf_dir

        args.onnx = cached_export(hf_dir())
    if args.model is None:
        src = json.loads((args.onnx / "lorax.json").read_text())["source"]
        args.model = (args.onnx / src["path"]).resolve() if src.get("relative_to") else Path(src["path"])
    work = args.onnx.parent / f"sweep-{args.onnx.name}"
    graphs = build(args.onnx, work, args.settings, args.model, args.adapter)
    f32 = ONNXRunner(args.onnx, variant="float32", threads=args.threads)
    tok = f32.tokenizer
    chats = [list(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)) for c in CHATS]
    ids = [*chats, list(tok(TEXT)["input_ids"])]
    ref = [f32.logits(i) for i in ids]
    ref_gen = [f32.generate(c, 24) for c in chats]
    runners = {"float32": f32, **{n: ONNXRunner(p, threads=args.threads) for n, p in graphs.items()}}
    rows = {}
    for name, r in runners.items():
        p = compare(ref, [r.logits(i) for i in ids], ids)
        same = sum(r.generate(c, 24) == g for c, g in zip(chats, ref_gen, strict=True))
        graph = graphs.get(name) or args.onnx / "onnx" / "model.onnx"
        size = sum(f.stat().st_size for f in graph.parent.glob(graph.name + "*"))
        rows[name] = {"kld_mean": p.kld_mean, "kld_p99": p.kld_p99, "top1": p.top1, "greedy_same": same,
                      "size_mb": size / 1e6, "tok_s": []}
    for rnd in range(args.rounds):
        order = list(runners) if rnd % 2 == 0 else list(runners)[::-1]
        for name in order:
            runners[name].measure_decode(ids[0], 4)  # warm-up of this session's buffers
            rows[name]["tok_s"].append(runners[name].measure_decode(ids[0], args.tokens).tokens_per_s)
    base = statistics.median(rows["float32"]["tok_s"])
    print(f"\n{args.tokens} tokens x {args.rounds} rounds, {args.threads} threads, vs float32 ({args.onnx})")
    print("| setting | decode tok/s | x float32 | mean KLD | p99 KLD | top-1 | greedy = f32 (of 3) | MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        rate = statistics.median(row["tok_s"])
        row["tok_s_median"], row["speedup"] = rate, rate / base
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {row['kld_mean']:.4f} | {row['kld_p99']:.3f} | "
              f"{row['top1']:.3f} | {row['greedy_same']} | {row['size_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.exit(main())
