"""Benchmark the GGUF writer against llama.cpp's own convert_hf_to_gguf.py, measured in the same run.

    python scripts/bench_gguf.py                       # peer from pip's cache or $LORAX_LLAMA_CPP_CONVERTER
    python scripts/bench_gguf.py --peer llama_cpp_python-0.3.36.tar.gz   # sdist, its folder, or the script
    python scripts/bench_gguf.py --model merged/ --skip-quality

1. Speed and memory, f16 on one merged model (default: a random 1.18B Llama-shaped bf16 checkpoint with
   SmolLM2's tokenizer, generated once under ~/.cache/lorax/bench): wall time and peak RSS of each
   converter in its own process. Targets: time <= 1x the peer, peak RSS <= 0.6x the peer.
2. Quality on SmolLM2 (same 512 ids for both): mean KLD / top-1 vs transformers for f32, q8_0 and q4_k_m
   (the peer's q4_k_m is quantized from its own f32 by the same libllama quantizer).

llama.cpp's converter is not a package: it ships inside the llama-cpp-python source distribution. It is
only run from where it is found (never copied into this repository); without it the peer is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lorax_common.cache import cache_dir

ROOT = Path(__file__).resolve().parents[1]
CACHE = cache_dir() / "bench"
CONVERTER = "convert_hf_to_gguf.py"
# what the converter needs next to it (its model classes and its own gguf-py)
PEER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

# 1.18B parameters: 22 x 44.0M (Llama blocks, GQA 32/4) + 2 x 100.7M (untied embeddings, SmolLM2 vocab)
BENCH_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "vocab_size": 49152,
    "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    "dtype": "bfloat16", "hidden_act": "silu",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


# ------------------------------------------------------------------------------------------ the peer


def find_peer(explicit: str | None) -> Path | None:
    """A directory holding convert_hf_to_gguf.py + conversion/ + gguf-py/, extracted from an sdist if needed."""
    candidates = [Path(p) for p in (explicit, os.environ.get("LORAX_LLAMA_CPP_CONVERTER")) if p]
    candidates += sorted((Path.home() / ".cache" / "pip").rglob("llama_cpp_python-*.tar.gz"))
    candidates += sorted((CACHE / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not explicit and not candidates:
        candidates = _download_sdist()
    for cand in candidates:
        if cand.is_file() and cand.name == CONVERTER:
            return cand.parent
        if cand.is_dir():
            hits = sorted(cand.rglob(CONVERTER))
            if hits:
                return hits[0].parent
        if cand.is_file() and tarfile.is_tarfile(cand):
            return _extract_peer(cand)
    return None


def _download_sdist() -> list[Path]:
    """The sdist of the installed llama-cpp-python from PyPI (the registry is allowed; no model hub): its
    vendored llama.cpp carries convert_hf_to_gguf.py, the converter at the exact version lorax links."""
    from importlib.metadata import version

    dest = CACHE / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version('llama-cpp-python')}", "-d", str(dest)]
    if subprocess.run(cmd).returncode != 0:
        return []
    return sorted(dest.glob("llama_cpp_python-*.tar.gz"))


def _extract_peer(sdist: Path) -> Path | None:
    dest = CACHE / "peer" / sdist.name.removesuffix(".tar.gz")
    if (dest / CONVERTER).is_file():
        return dest
    with tarfile.open(sdist) as tar:
        prefix = next((m.name[: -len(CONVERTER)] for m in tar.getmembers()
                       if m.name.endswith(f"vendor/llama.cpp/{CONVERTER}")), None)
        if prefix is None:
            return None
        members = [m for m in tar.getmembers()
                   if any(m.name.startswith(prefix + part) for part in PEER_PARTS)]
        for m in members:
            m.name = m.name[len(prefix):]
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        tar.extractall(tmp, members=members, filter="data")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return dest


def peer_quantize(sdist: Path | None = None) -> Path | None:
    """llama.cpp's own `llama-quantize`, built once from the vendored llama.cpp of the llama-cpp-python sdist
    (the exact libllama lorax links; ~3.5 min with cmake + a C++ compiler on 2 cores), cached under
    ~/.cache/lorax/bench/peer. None without the sdist or a toolchain."""
    if sdist is None:
        found = sorted((CACHE / "sdist").glob("llama_cpp_python-*.tar.gz")) or _download_sdist()
        sdist = found[-1] if found else None
    if sdist is None or shutil.which("cmake") is None:
        return None
    dest = CACHE / "peer" / (sdist.name.removesuffix(".tar.gz") + "-llama-quantize")
    if dest.is_file():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp(dir=CACHE))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(src, members=members, filter="data")
        root = next(src.glob("*/vendor/llama.cpp"))
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        for cmd in (["cmake", "-S", str(root), "-B", str(root / "build"), *gen, *flags],
                    ["cmake", "--build", str(root / "build"), "--target", "llama-quantize", "-j", str(os.cpu_count())]):
            run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if run.returncode != 0:  # say why, so a skipped check is not silent
                print(f"llama-quantize build failed ({cmd[1]}): {run.stderr[-1500:]}", file=sys.stderr)
                return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / "build" / "bin" / "llama-quantize", dest.with_suffix(".tmp"))
        dest.with_suffix(".tmp").rename(dest)
        return dest
    finally:
        shutil.rmtree(src, ignore_errors=True)


# ------------------------------------------------------------------------------------- bench model


def bench_model(smollm2_dir: Path) -> Path:
    """A random 1.18B Llama-shaped bf16 checkpoint in two safetensors shards (built once, then cached)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    out = CACHE / "llama-1.18b-bf16"
    if (out / "model.safetensors.index.json").is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    c = BENCH_CONFIG
    h, ff, kv, v = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                       p + "mlp.down_proj.weight": (h, ff), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    gen = torch.Generator().manual_seed(0)
    names = list(shapes)
    half = len(names) // 2
    weight_map = {}
    for n, part in enumerate((names[:half], names[half:])):
        fname = f"model-{n + 1:05d}-of-00002.safetensors"
        tensors = {}
        for name in tqdm(part, desc=f"bench model shard {n + 1}/2"):
            shape = shapes[name]
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(BENCH_CONFIG, indent=2))
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, tmp / name)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------------------- measuring


# Runs the command as its own child and reports that child's wall time and peak RSS. The indirection matters:
# Linux carries a parent's RSS high-water mark into a forked child's ru_maxrss across exec, so measuring a
# direct child of this (torch-importing) process would report this process's size, not the converter's.
_MEASURE = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - t0, "rss": usage.ru_maxrss * 1024,
                  "rc": os.waitstatus_to_exitcode(status)}))
"""


def measured(cmd: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command run in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"rc": proc.returncode}
    if result["rc"] != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return result["wall"], result["rss"]


def ours_cmd(model: Path, out: Path, out_type: str) -> list[str]:
    code = ("from formats.gguf.writer import write_gguf; "
            f"write_gguf({str(model)!r}, {str(out)!r}, {out_type!r}, progress=False)")
    return [sys.executable, "-c", code]


def peer_cmd(peer: Path, model: Path, out: Path, out_type: str) -> list[str]:
    return [sys.executable, str(peer / CONVERTER), str(model), "--outtype", out_type, "--outfile", str(out)]


def warm(model: Path) -> None:
    """Read the weights once so both converters start with the same (warm) page cache."""
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def speed(model: Path, peer: Path | None, repeat: int) -> None:
    warm(model)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"\n== f16 conversion of {model.name} ({size / 1e9:.2f} GB of safetensors), best of {repeat}")
    results: dict[str, list[tuple[float, int]]] = {"lorax": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for _ in range(repeat):
            runs = [("lorax", ours_cmd(model, Path(tmp) / "ours.gguf", "f16"), None)]
            if peer:
                runs.append(("llama.cpp", peer_cmd(peer, model, Path(tmp) / "peer.gguf", "f16"), peer))
            for name, cmd, cwd in runs:
                results[name].append(measured(cmd, cwd))
                for f in Path(tmp).glob("*.gguf"):
                    f.unlink()
    best = {k: (min(t for t, _ in v), min(r for _, r in v)) for k, v in results.items() if v}
    for name, (t, rss) in best.items():
        print(f"{name:>10}: {t:6.1f} s   peak RSS {rss / 1e9:.2f} GB")
    if "llama.cpp" not in best:
        print("llama.cpp peer: skipped (no convert_hf_to_gguf.py found; pass --peer or set "
              "LORAX_LLAMA_CPP_CONVERTER to the llama-cpp-python sdist)")
        return
    (t, rss), (pt, prss) = best["lorax"], best["llama.cpp"]
    print(f"     ratio: time {t / pt:.2f}x (target <= 1.0: {'ok' if t <= pt else 'MISSED'})   "
          f"peak RSS {rss / prss:.2f}x (target <= 0.6: {'ok' if rss <= 0.6 * prss else 'MISSED'})")


def quality(smollm2_dir: Path, peer: Path | None) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_helpers import ENGLISH, parity

    from formats.gguf.export import GGUFOptions, export_gguf
    from formats.gguf.quantize import quantize_gguf

    types = ["f32", "q8_0", "q4_k_m"]
    print(f"\n== quality on SmolLM2, 512 tokens of English, vs transformers float32 ({', '.join(types)})")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        ours = {f.type: f.path for f in export_gguf(smollm2_dir, Path(tmp) / "ours", types, GGUFOptions(progress=False))}
        theirs: dict[str, Path] = {}
        if peer:
            pdir = Path(tmp) / "peer"
            pdir.mkdir()
            for t in ("f32", "q8_0"):
                measured(peer_cmd(peer, smollm2_dir, pdir / f"{t}.gguf", t), peer)
                theirs[t] = pdir / f"{t}.gguf"
            quantize_gguf(theirs["f32"], pdir / "q4_k_m.gguf", "q4_k_m")
            theirs["q4_k_m"] = pdir / "q4_k_m.gguf"
        for t in types:
            a = parity(smollm2_dir, ours[t], n_tokens=512, text=ENGLISH, n_threads=None)
            line = f"{t:>7}: lorax kld {a.kld_mean:.3g} top1 {a.top1:.3f}"
            if t in theirs:
                b = parity(smollm2_dir, theirs[t], n_tokens=512, text=ENGLISH, n_threads=None)
                line += (f" | llama.cpp kld {b.kld_mean:.3g} top1 {b.top1:.3f}"
                         f" | kld ratio {a.kld_mean / b.kld_mean:.2f}x")
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", help="llama-cpp-python sdist (.tar.gz), its folder, or convert_hf_to_gguf.py")
    ap.add_argument("--model", type=Path, help="HF model dir for the speed test (default: random 1.18B bf16)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from default_model import hf_dir

    CACHE.mkdir(parents=True, exist_ok=True)
    peer = find_peer(args.peer)
    print(f"llama.cpp converter: {peer / CONVERTER if peer else 'not found (peer skipped)'}")
    smollm2 = hf_dir()
    if not args.skip_speed:
        speed(args.model or bench_model(smollm2), peer, args.repeat)
    if not args.skip_quality:
        quality(smollm2, peer)


if __name__ == "__main__":
    main()
