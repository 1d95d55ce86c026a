"""Benchmark `lorax merge` against PEFT's merge, in the same run, on a Llama-shaped random model.

    python scripts/bench_merge.py                  # ~1.1B params (TinyLlama shape), bf16, rank-16 all-linear
    python scripts/bench_merge.py --size small     # ~0.1B, a quick run
    python scripts/bench_merge.py --json out.json  # also write the numbers

Sides (each in its own subprocess, so peak RSS is its own: ru_maxrss from os.wait4):
  lorax   `lorax merge ADAPTER --out DIR` with its defaults: the exact NF4 (+double quant) round trip of
          every linear weight, fold, streamed to sharded safetensors, sha256 of the base verified
  peft    AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
          (the usual recipe; it folds into the original weights, which is not the trained model)
  imports python -c "import torch, transformers, peft, bitsandbytes": the floor both sides pay
Targets (the merge issue): peak RSS <= 0.3x PEFT's, time <= 1x PEFT's. Also: the 4-bit round trip
alone, exporter.merge.quant4 vs bitsandbytes, on one MLP weight (MB/s of bf16 weights, bit-identical check).
The machine is shared and noisy: compare the ratios, which are measured side by side.
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

from bench_export import ALPHA, RANK, TARGETS  # noqa: E402  (the same random adapter as the export bench)

# name -> Llama shape (hidden, intermediate, layers, heads, kv heads, vocab)
SIZES = {
    "1b": (2048, 5632, 22, 32, 4, 32000),  # 1.10B, TinyLlama-1.1B's shape
    "small": (768, 2048, 12, 12, 4, 32000),  # 0.11B
    "tiny": (256, 704, 4, 8, 4, 8000),
}


def build_base(out: Path, size: str) -> Path:
    """A random bf16 Llama checkpoint, written tensor by tensor (cached: building 1B takes a while)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from formats.hf.writer import ShardedWriter, TensorSpec

    if (out / "config.json").exists():
        return out
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(tmp, [TensorSpec(n, torch.bfloat16, s) for n, s in params], 5 * 1024**3)
    gen = torch.Generator().manual_seed(0)
    for name, shape in params:
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
    config.save_pretrained(tmp)
    tmp.rename(out)
    return out


def build_adapter(base: Path, out: Path) -> Path:
    """A random rank-16 all-linear LoRA adapter + lorax.json saying it was trained on NF4 + double quant."""
    import hashlib

    from bench_export import adapter_config, random_lora
    from safetensors.torch import save_file

    from lorax_common.hashing import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(random_lora(base), out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(base), indent=2))
    digest = sha256_file(base / "model.safetensors")
    (out / "lorax.json").write_text(json.dumps({
        "kind": "adapter", "lorax_version": "0.1.0", "created": "bench",
        "base": {"path": str(base), "files": {"model.safetensors": digest},
                 "weights_sha256": hashlib.sha256(digest.encode()).hexdigest(), "storage_dtype": "bfloat16",
                 "architecture": "llama"},
        "quantization": {"method": "bnb-4bit", "quant_type": "nf4", "blocksize": 64, "double_quant": True,
                         "compute_dtype": "float32", "quant_storage": "uint8", "load_dtype": "bfloat16"},
        "lora": {"r": RANK, "alpha": ALPHA, "target_modules": TARGETS, "use_rslora": False}}, indent=2))
    return out


PEFT_SIDE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def run_side(cmd: list[str]) -> dict[str, float]:
    """Wall time and peak RSS (ru_maxrss of that process alone) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{err.decode()[-2000:]}")
    return {"seconds": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def quant4_vs_bnb() -> dict[str, float]:
    """The round trip alone, on one 5632x2048 bf16 weight: exporter.merge.quant4 vs bitsandbytes."""
    import bitsandbytes.functional as bnbf
    import torch

    from exporter.merge.quant4 import Quant4Spec, round_trip

    w = (torch.randn(5632, 2048, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    spec = Quant4Spec("nf4", 64, True, torch.bfloat16)
    mb = w.numel() * 2 / 1e6
    round_trip(w[:64], spec)  # warm the tables
    t0 = time.perf_counter()
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, state).float()  # bf16 output: the same values rounded to bf16
    t1 = time.perf_counter()
    mine = round_trip(w, spec)
    t2 = time.perf_counter()
    return {"bnb_mb_s": mb / (t1 - t0), "quant4_mb_s": mb / (t2 - t1), "speedup": (t1 - t0) / (t2 - t1),
            "identical_at_bf16": bool(torch.equal(mine.to(torch.bfloat16).float(), ref))}


def prepare(size: str, work: Path) -> dict:
    """Build (or reuse) the base and the adapter; returns their paths (runs in a child process)."""
    t0 = time.perf_counter()
    base = build_base(work / f"llama-{size}", size)
    adapter = build_adapter(base, work / f"adapter-{size}")
    gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    return {"base": str(base), "adapter": str(adapter), "base_gb": gb, "prepare_s": time.perf_counter() - t0}


def child(what: str, *args: str) -> dict:
    """Run this script's `what` step in a fresh interpreter and return its JSON answer."""
    out = subprocess.run([sys.executable, __file__, f"--{what}", *args], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "lorax" / "bench")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quant4", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        print(json.dumps(prepare(args.size, args.work)))
        return
    if args.quant4:
        print(json.dumps(quant4_vs_bnb()))
        return
    # This process never imports torch: a child's ru_maxrss starts from its parent's RSS at fork time.
    prep = child("prepare", "--size", args.size, "--work", str(args.work))
    print(f"base {prep['base']} ({prep['base_gb']:.2f} GB), adapter ready in {prep['prepare_s']:.0f}s", flush=True)
    py, out = sys.executable, args.work / "out"
    results = {
        "imports": run_side([py, "-c", "import torch, transformers, peft, bitsandbytes"]),
        "peft": run_side([py, "-c", PEFT_SIDE, prep["base"], prep["adapter"], str(out / "peft")]),
        "lorax": run_side([py, "-m", "exporter.cli", "merge", prep["adapter"], "--out", str(out / "lorax"), "--force"]),
    }
    results["ratios"] = {"time": results["lorax"]["seconds"] / results["peft"]["seconds"],
                         "peak_rss": results["lorax"]["peak_rss_gb"] / results["peft"]["peak_rss_gb"]}
    results["quant4"] = child("quant4")
    results.update(size=args.size, base_gb=prep["base_gb"])
    for side in ("imports", "peft", "lorax"):
        r = results[side]
        print(f"{side:8s} {r['seconds']:7.1f} s   peak RSS {r['peak_rss_gb']:.2f} GB")
    ratio = results["ratios"]
    print(f"lorax / peft: time {ratio['time']:.2f}x (target <= 1), peak RSS {ratio['peak_rss']:.2f}x (target <= 0.3)")
    q = results["quant4"]
    print(f"NF4+dq round trip: quant4 {q['quant4_mb_s']:.0f} MB/s vs bitsandbytes {q['bnb_mb_s']:.0f} MB/s "
          f"({q['speedup']:.1f}x), same values: {q['identical_at_bf16']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
