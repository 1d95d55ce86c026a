"""`lorax export --gguf --quant q4_k_m` with its gate vs the peer path, on the 1.18B bench model, in one run.

    python scripts/bench_export.py [--samples 16] [--json out.json]

Sides, each command in a fresh process (wall time and peak RSS of that process alone, bench_gguf.measured):
  lorax  `lorax -q export ADAPTER --out DIST --gguf --quant q4_k_m --max-samples 16`: the exact merge of the
         base as trained, the importance matrix from the adapter's training data, the GGUF, its
         quantization and the whole gate (reference on the 4-bit base, every target, control, floor);
         its stages come from DIST/report.json's timing.
  peer   what a user runs without lorax, and without any check: PEFT merge_and_unload + save_pretrained
         (bf16), llama.cpp's convert_hf_to_gguf.py --outtype bf16, llama_model_quantize to q4_k_m.
The model is the random 1.18B Llama-shaped bf16 checkpoint with SmolLM2's tokenizer that
scripts/bench_gguf.py builds (cached under $LORAX_CACHE/bench); the adapter a random rank-16 all-linear
LoRA whose lorax.json says NF4 + double quant, written by lorax's own record code, with 200 chat rows of
"training data" (the importance matrix calibrates on them) and 16 held-out rows for the gate. Targets
(issue 18): lorax's total <= 3x the peer's time, peak RSS <= 1.5x the peer's peak.

--precision is what the adapter's lorax.json records about training, as `lorax train` writes it:
  bf16     compute and load dtype bfloat16: `lorax train` on a bf16-capable GPU (train/model.py
           auto_compute_dtype), and the usual QLoRA recipe (bnb_4bit_compute_dtype=bfloat16). The merge,
           the GGUF source and the control are bf16, as training computed.
  float32  compute and load dtype float32: `lorax train` on a CPU. Everything exact is float32 (4.7 GB at
           1.18B, more than 1.5x the peer's whole peak on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_gguf  # noqa: E402

RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""

QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def rows(n: int, offset: int = 0) -> list[dict]:
    """Chat rows with short answers (the gate's task metric needs an answer)."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 17 + 2, i % 11 + 3
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer with the number."},
                                 {"role": "assistant", "content": str(a + b)}]})
    return out


def random_lora(base: Path) -> dict:
    """Random rank-16 LoRA tensors for every target linear layer of `base` (shapes read from its headers)."""
    import torch
    from safetensors import safe_open

    from lorax_common.files import weight_files

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for f in weight_files(base):
        with safe_open(f, "pt") as fh:
            for key in fh.keys():
                module = key.removesuffix(".weight")
                if module.rsplit(".", 1)[-1] in TARGETS:
                    n_out, n_in = fh.get_slice(key).get_shape()
                    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, n_in, generator=gen) / n_in**0.5
                    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, RANK, generator=gen) * 0.01
    return tensors


def adapter_config(base: Path) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
            "target_modules": TARGETS, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "base_model_name_or_path": str(base), "modules_to_save": None}


# --precision -> the dtype `lorax train` records for compute and load (both the same, as it trains)
PRECISIONS = {"bf16": "bfloat16", "float32": "float32"}


def build_adapter(base: Path, out: Path, dtype: str) -> Path:
    """A random rank-16 LoRA on every linear layer, saved as PEFT does, with lorax.json from lorax's record code
    saying training computed (and loaded the base) in `dtype`."""
    from safetensors.torch import save_file

    from lorax_common import record
    from train.lorax_json import base_record, build

    if (out / "lorax.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + "."))
    save_file(random_lora(base), tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(base), indent=2))
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows(200)))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(16, offset=500)))
    quant = {"method": "bnb-4bit", "quant_type": "nf4", "blocksize": 64, "double_quant": True,
             "compute_dtype": dtype, "quant_storage": "uint8", "load_dtype": dtype}
    lora = {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS, "use_rslora": False,
            "modules_to_save": None}
    data = {"path": str(out / "train.jsonl"), "sha256": "", "format": "messages", "eval_fraction": 0.0,
            "eval_file": "eval.jsonl", "max_seq_len": 512, "truncated": 0}
    rec = build(base=base_record(base, "bfloat16", "llama"), quantization=quant, lora=lora, data=data, seed=0,
                training={"max_steps": 0}, metrics={})
    record.write(tmp, rec)
    tmp.rename(out)
    return out


def lorax_side(adapter: Path, dist: Path, samples: int) -> dict:
    """The export in a fresh process; a failed gate (exit 1) is a result here (random weights), not an error."""
    import subprocess

    cmd = [sys.executable, "-m", "exporter.cli", "-q", "export", str(adapter), "--out", str(dist), "--gguf",
           "--quant", "q4_k_m", "--max-samples", str(samples), "--force"]
    proc = subprocess.run([sys.executable, "-c", bench_gguf._MEASURE, *cmd], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] not in (0, 1):
        raise SystemExit(f"lorax export failed (exit {result['rc']}):\n{proc.stderr[-2000:]}")
    wall, rss = result["wall"], result["rss"]
    report = json.loads((dist / "report.json").read_text())
    return {"seconds": wall, "peak_rss_gb": rss / 1e9, "stages": report["timing"]["stages"],
            # the process's high-water mark as each stage ended: the first stage that shows the peak set it
            "rss_after_gb": {k: v * 2**20 / 1e9 for k, v in report["timing"].get("peak_rss_after_mib", {}).items()},
            "gate_passed": report["passed"],
            "targets": {t["name"]: {k: t["metrics"].get(k) for k in ("kld_mean", "top1")} for t in report["targets"]}}


def peer_side(base: Path, adapter: Path, work: Path, converter: Path) -> dict:
    py = sys.executable
    merged, bf16, q4 = work / "peer-merged", work / "peer-bf16.gguf", work / "peer-q4_k_m.gguf"
    steps = {
        "peft merge + save": [py, "-c", PEFT_MERGE, str(base), str(adapter), str(merged)],
        "convert_hf_to_gguf bf16": bench_gguf.peer_cmd(converter, merged, bf16, "bf16"),
        "llama_model_quantize q4_k_m": [py, "-c", QUANTIZE, str(bf16), str(q4)],
    }
    out = {}
    for name, cmd in steps.items():
        wall, rss = bench_gguf.measured(cmd, cwd=ROOT)
        out[name] = {"seconds": wall, "peak_rss_gb": rss / 1e9}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                    help="what training computed in, as recorded in the adapter's lorax.json (see above)")
    ap.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py (default: from the llama-cpp-python sdist)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ["LORAX_REFERENCE_CACHE"] = "off"  # a first export: nothing reused
    from default_model import hf_dir

    converter = bench_gguf.find_peer(args.converter)
    if converter is None:
        raise SystemExit("llama.cpp's convert_hf_to_gguf.py not found; pass --converter")
    base = bench_gguf.bench_model(hf_dir())
    adapter = build_adapter(base, bench_gguf.CACHE / f"adapter-1.18b-{args.precision}", PRECISIONS[args.precision])
    with tempfile.TemporaryDirectory(dir=bench_gguf.CACHE) as work:
        work = Path(work)
        peer = peer_side(base, adapter, work, converter)
        ours = lorax_side(adapter, work / "dist", args.samples)
    peer_s = sum(s["seconds"] for s in peer.values())
    peer_rss = max(s["peak_rss_gb"] for s in peer.values())
    print(f"model {base.name}, adapter trained in {args.precision}, {args.samples} gate samples")
    for name, s in peer.items():
        print(f"  peer  {name:28s} {s['seconds']:7.1f} s   peak RSS {s['peak_rss_gb']:.2f} GB")
    print(f"  peer  {'total (no check)':28s} {peer_s:7.1f} s   peak RSS {peer_rss:.2f} GB")
    for name, secs in ours["stages"].items():
        mark = ours["rss_after_gb"].get(name)
        print(f"  lorax {name:28s} {secs:7.1f} s" + (f"   RSS high-water {mark:.2f} GB" if mark else ""))
    print(f"  lorax {'total (with the gate)':28s} {ours['seconds']:7.1f} s   peak RSS {ours['peak_rss_gb']:.2f} GB"
          f"   gate {'passed' if ours['gate_passed'] else 'failed'}")
    ratio_t, ratio_m = ours["seconds"] / peer_s, ours["peak_rss_gb"] / peer_rss
    print(f"lorax / peer: time {ratio_t:.2f}x (target <= 3), peak RSS {ratio_m:.2f}x (target <= 1.5)")
    if args.json:
        out = {"precision": args.precision, "peer": peer, "lorax": ours, "ratios": {"time": ratio_t, "rss": ratio_m}}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
