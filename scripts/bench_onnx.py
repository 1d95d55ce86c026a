"""ONNX (float32 and int4, KV cache) greedy decode in onnxruntime vs PyTorch eager `generate`, in the same run.

    python scripts/bench_onnx.py                          # merged SmolLM2, 128 tokens, 2 threads, 3 rounds
    python scripts/bench_onnx.py --quick                  # 32 tokens, 1 round
    python scripts/bench_onnx.py --peer-onnx optimum-out/ # also time another ONNX export (e.g. optimum's)

Both sides get the same model (the imported SmolLM2 HF dir unless --model), the same chat prompts
as token ids, the same thread count, and produce the same number of greedy tokens (no early stop);
each side runs in a fresh process, alternating torch, onnx, onnx, torch, ... so a shared machine's
drift cancels. tokens/s = new tokens / (prefill + decode) wall time, median over prompts and rounds;
the ratios are onnx / torch (target >= 2) and int4 / float32 onnx (target >= 2). The ONNX export
(`--onnx-quant int4`: onnx/model.onnx + onnx/model_q4.onnx, GPTQ calibrated on the demo task's training rows)
is built once and cached under ~/.cache/lorax/bench (its export time is printed when it is built). Quality of every quantization
setting: scripts/sweep_onnx_quant.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Explain how a bicycle stays upright while moving.",
    "Write a short story about a lighthouse keeper.",
    "What are the main differences between rivers and glaciers?",
]
TARGET_RATIO = 2.0
GRAPH = "gqa"  # the cached export is rebuilt when lorax.json's graph kind differs (an older export)


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    return out


# ---- one side, in its own process ---------------------------------------------------------------

def run_torch(model_dir: Path, ids: list[list[int]], n: int, threads: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        model.generate(torch.tensor([ids[0]]), max_new_tokens=2, do_sample=False)  # warm-up
        for x in ids:
            t = time.perf_counter()
            gen = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False)
            secs = time.perf_counter() - t
            out.append({"secs": secs, "tokens": gen[0, len(x):].tolist()})
    return out


def run_onnx(onnx_dir: Path, ids: list[list[int]], n: int, threads: int) -> list[dict]:
    from formats.onnx.runner import ONNXRunner

    runner = ONNXRunner(onnx_dir, threads=threads)
    runner.measure_decode(ids[0], 2)  # warm-up
    out = []
    for x in ids:
        s = runner.measure_decode(x, n - 1)  # the prefill yields the first of the n tokens
        out.append({"secs": s.prefill_s + s.decode_s, "decode_tok_s": s.tokens_per_s,
                    "tokens": _until_stop(list(s.tokens), runner.stop)})
    return out


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    """Up to (not including) the first end-of-turn token: torch's min_new_tokens forbids it there."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stop), tokens)


def side_main(args: argparse.Namespace) -> int:
    ids = json.loads(args.ids)
    fn = run_torch if args.side == "torch" else run_onnx
    print(json.dumps(fn(Path(args.path), ids, args.tokens, args.threads)))
    return 0


# ---- the comparison ------------------------------------------------------------------------------

def demo_calibration(model_dir: Path) -> list[list[int]]:
    """int4's GPTQ rows: the demo task's 300 training rows (scripts/make_demo_data.py, deterministic), as a
    fine-tune's export calibrates on its training rows. Decode speed does not depend on which rows."""
    import tempfile

    from make_demo_data import make
    from transformers import AutoTokenizer

    from exporter.export.calibration import calibration_sequences

    with tempfile.TemporaryDirectory() as tmp:
        train, _ = make(tmp)
        return calibration_sequences(model_dir, AutoTokenizer.from_pretrained(model_dir), train).sequences


def cached_export(model_dir: Path) -> Path:
    from formats.onnx.export import export_onnx
    from formats.onnx.quantize import setting
    from lorax_common.cache import cache_dir

    out = cache_dir() / "bench" / f"onnx-{model_dir.name}-int4"
    meta = out / "lorax.json"
    source = str(model_dir.resolve())
    recorded = json.loads(meta.read_text()) if meta.is_file() else {}
    algorithm = (recorded.get("quantization") or {}).get("algorithm")
    if (recorded.get("source") or {}).get("path") == source and recorded.get("graph") == GRAPH \
            and algorithm == setting("int4").algorithm and (out / "onnx" / "model_q4.onnx").is_file():
        return out
    t = time.perf_counter()
    export_onnx(source, out, quant="int4", force=True, calibration=demo_calibration(model_dir))
    print(f"built the ONNX export once ({time.perf_counter() - t:.0f} s): {out}")
    return out


def side(name: str, path: Path, ids: list[list[int]], n: int, threads: int) -> list[dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--side", name, "--path", str(path), "--ids", json.dumps(ids),
                           "--tokens", str(n), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} side failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="merged HF dir (default: the imported SmolLM2)")
    ap.add_argument("--onnx", type=Path, help="lorax ONNX export of --model (default: built once and cached)")
    ap.add_argument("--peer-onnx", type=Path, help="another ONNX export in optimum's layout to time as well")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="--tokens 32 --rounds 1")
    ap.add_argument("--side", choices=["torch", "onnx"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return side_main(args)
    if args.quick:
        args.tokens, args.rounds = 32, 1
    if args.model is None:
        from default_model import hf_dir

        args.model = hf_dir()
    onnx_dir = args.onnx or cached_export(args.model)
    ids = prompt_ids(args.model)
    from formats.onnx.bundle import graph_path

    sides = {"torch eager": ("torch", args.model), "lorax onnx": ("onnx", graph_path(onnx_dir, "float32"))}
    if graph_path(onnx_dir, "int4").is_file():
        sides["onnx int4"] = ("onnx", graph_path(onnx_dir, "int4"))
    if args.peer_onnx:
        sides["peer onnx"] = ("onnx", args.peer_onnx)
    results: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for label in order:
            kind, path = sides[label]
            results[label] += side(kind, path, ids, args.tokens, args.threads)

    n = args.tokens
    print(f"\n== greedy decode, {n} new tokens x {len(ids)} prompts x {args.rounds} rounds, "
          f"{args.threads} threads, {args.model.name} float32")
    rate = {k: statistics.median(n / x["secs"] for x in v) for k, v in results.items()}
    for label, v in results.items():
        extra = ""
        if "decode_tok_s" in v[0]:
            extra = f"   (decode only {statistics.median(x['decode_tok_s'] for x in v):6.1f} tok/s)"
        print(f"{label:>12}: {rate[label]:6.1f} tok/s end to end{extra}")
    ratio = rate["lorax onnx"] / rate["torch eager"]
    print(f"       ratio: lorax onnx / torch eager = {ratio:.2f}x (target >= {TARGET_RATIO}: "
          f"{'ok' if ratio >= TARGET_RATIO else 'MISSED'})")
    if "onnx int4" in rate:
        q4 = rate["onnx int4"] / rate["lorax onnx"]
        print(f"       ratio: onnx int4 / onnx float32 = {q4:.2f}x (target >= {TARGET_RATIO}: "
              f"{'ok' if q4 >= TARGET_RATIO else 'MISSED'})")
    if "peer onnx" in rate:
        print(f"       ratio: lorax onnx / peer onnx = {rate['lorax onnx'] / rate['peer onnx']:.2f}x (target >= 1)")
    k = len(ids)
    same = [o["tokens"] == t["tokens"][: len(o["tokens"])]
            for o, t in zip(results["lorax onnx"][:k], results["torch eager"][:k], strict=True)]
    print(f"same greedy tokens as torch (up to end of turn): {sum(same)}/{k} prompts")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
