"""`lorax merge ADAPTER --out DIR`: fold a LoRA adapter into full weights, exactly as it was trained.

    lorax merge adapter/ --out merged/                        # QLoRA adapter: --merge-base quantized
    lorax merge adapter/ --out merged/ --merge-base auto      # build both bases, keep the closer one
    lorax merge peft_dir/ --out merged/ --trained-on nf4      # a plain PEFT adapter (no lorax.json)

    from exporter.merge.plan import merge_adapter                  # what `lorax export` calls
    merge_adapter("adapter/", "merged/")

A QLoRA adapter was trained on top of dequant(NF4(W)), not on W: folding it into W ships a model that
differs from the trained one (SmolLM2: mean KLD 0.46 for the base alone, ../shared/DESIGN.md). So every
weight bitsandbytes quantized in training is re-created bit for bit (exporter.merge.quant4), dequantized, and
the adapter added in float32: W' = deq(q(W)) + scale * B @ A. The base is streamed tensor by tensor in
row chunks (exporter.merge.io), so peak memory is about one chunk, not the model.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.errors import LoraxError
from exporter.gate.reference import AdapterInfo, BaseLayout
from exporter.merge.io import Buffers, read_job_rows, row_ranges

MERGE_BASES = ("auto", "quantized", "original")
DEFAULT_SHARD_BYTES = 5 * 1024**3

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\."
                      r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<param>weight|bias))?$")


# ---- pure math -------------------------------------------------------------------------------------

def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def fold(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool = False) -> torch.Tensor:
    """w += scale * (B @ A), or its transpose (embeddings, fan_in_fan_out); in place, float32, returns w.

    For a row chunk of w pass the matching rows: b[rows] (plain), or a[:, rows] (transposed).
    """
    if transpose:
        return w.addmm_(a.t(), b.t(), alpha=scale)
    return w.addmm_(b, a, alpha=scale)


# ---- the plan: which base tensor gets what -----------------------------------------------------------

@dataclass
class LoraTerm:
    module: str
    a: torch.Tensor  # [r, in] (embedding: [r, num_embeddings])
    b: torch.Tensor  # [out, r] (embedding: [dim, r])
    scale: float
    transpose: bool


@dataclass
class Job:
    """One output tensor: where its values come from and what is added to them."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # source dtype
    source: tuple[Path, str] | None = None  # base tensor to stream
    replacement: torch.Tensor | None = None  # full tensor from the adapter (modules_to_save, base_layer)
    quantized: bool = False  # round-trip through 4 bits first, as training saw it
    terms: list[LoraTerm] = field(default_factory=list)
    bias_adds: list[tuple[torch.Tensor, float]] = field(default_factory=list)  # lora_B.bias * scale


@dataclass
class Plan:
    jobs: list[Job]
    untied: bool  # tied embeddings got separate output embeddings because the adapter changes one side
    counts: dict[str, int]


def _shape_error(module: str, expected: tuple, got: tuple, base_dir: Path) -> LoraxError:
    return LoraxError(f"adapter/base shape mismatch at {module}: the adapter needs {list(expected)} but "
                      f"{base_dir} has {list(got)}; the adapter was trained on another base (pass the right --base)")


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(list(pattern), module), default) if pattern else default


def build_plan(info: AdapterInfo, adapter: dict[str, torch.Tensor], base: list, layout: BaseLayout,
               merge_base: str) -> Plan:
    """Match adapter tensors to base tensors; refuse (one line) anything that does not fit."""
    cfg = info.peft_config
    loras: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"lora_A", "lora_B", "lora_B_bias"}
    embedding_modules: set[str] = set()
    replacements: dict[str, torch.Tensor] = {}
    for key, t in adapter.items():
        m = LORA_KEY.match(key)
        if m:
            part = m["part"].replace("lora_embedding_", "lora_")
            loras.setdefault(m["module"], {})[part + ("_bias" if m["param"] == "bias" else "")] = t
            if "embedding" in m["part"]:
                embedding_modules.add(m["module"])
        elif "lora_" in key:
            raise LoraxError(f"adapter tensor {key} is not plain LoRA (e.g. DoRA magnitude); lorax merge cannot fold it")
        else:
            name = key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            replacements[name.replace(".base_layer.", ".")] = t

    tie_src = layout.input_embeddings if layout.tied else None
    touched = set(replacements) | {f"{mod}.weight" for mod in loras}
    untie = bool(layout.tied and {layout.input_embeddings, layout.output_embeddings} & touched)
    jobs = {key: Job(key, shape, dtype, source=(path, key)) for path, key, shape, dtype in base}
    out_key = layout.output_embeddings
    if untie and out_key not in jobs and tie_src in jobs:
        src = jobs[tie_src]  # the tied output embedding was never stored: it starts as the input's values
        jobs[out_key] = Job(out_key, src.shape, src.dtype, source=src.source,
                            replacement=replacements.get(tie_src))

    for name, t in replacements.items():
        if name not in jobs:
            raise LoraxError(f"adapter tensor {name} has no counterpart in the base {info.base_dir}; "
                             "the adapter was trained on another base (pass the right --base)")
        if tuple(t.shape) != jobs[name].shape:
            raise _shape_error(name, tuple(t.shape), jobs[name].shape, info.base_dir)
        jobs[name].replacement = t

    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    for module, parts in sorted(loras.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            raise LoraxError(f"adapter module {module} lacks lora_A or lora_B; the adapter file is incomplete")
        a, b, emb = parts["lora_A"], parts["lora_B"], module in embedding_modules
        job = jobs.get(f"{module}.weight")
        if job is None:
            raise LoraxError(f"target module {module} is missing in the base {info.base_dir}; the adapter "
                             "was trained on another model (pass the right --base)")
        r = a.shape[0]
        if b.shape[1] != r:
            raise LoraxError(f"adapter module {module}: lora_A has rank {r} but lora_B rank {b.shape[1]}")
        transpose = emb or fan_in_fan_out
        need = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if job.shape != need:
            raise _shape_error(module, need, job.shape, info.base_dir)
        r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", r))
        if r_cfg != r:
            raise LoraxError(f"adapter module {module} has rank {r} but adapter_config.json says {r_cfg}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        scale = lora_scale(alpha, r, bool(cfg.get("use_rslora")))
        job.terms.append(LoraTerm(module, a.float(), b.float(), scale, transpose))
        if "lora_B_bias" in parts:
            bias = jobs.get(f"{module}.bias")
            if bias is None:
                raise LoraxError(f"adapter module {module} has a LoRA bias but the base layer has no bias")
            bias.bias_adds.append((parts["lora_B_bias"].float(), scale))

    quantized = 0
    if merge_base == "quantized":
        missing = sorted(layout.quantized - set(jobs))
        if missing:
            raise LoraxError(f"base {info.base_dir} lacks {missing[0]} (and {len(missing) - 1} more) that "
                             "training quantized; its checkpoint keys do not match the model's modules")
        for key in layout.quantized:
            if jobs[key].replacement is None:
                jobs[key].quantized = True
                quantized += 1
    for job in jobs.values():
        if (job.terms or job.quantized) and not job.dtype.is_floating_point:
            raise LoraxError(f"base tensor {job.name} is {job.dtype}, not floating point; cannot fold into it")
    counts = {"tensors": len(jobs), "quantized": quantized, "lora_modules": len(loras),
              "replaced": len(replacements)}
    return Plan(list(jobs.values()), untie, counts)


# ---- streaming ---------------------------------------------------------------------------------------

def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t: max and min propagate NaN and are two cheap passes (isfinite().all() was 15x slower)."""
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin())) if t.numel() else True


@dataclass
class _Ctx:
    """What every stripe of a merge needs: quantization spec, output dtype, the worker pool, buffers."""

    spec: Any
    out_dtype: torch.dtype
    pool: Any  # ThreadPoolExecutor, one worker per core, torch ops single-threaded inside
    workers: int
    scratch: Buffers = field(default_factory=Buffers)
    ring: Buffers = field(default_factory=lambda: Buffers(ring=3))  # queue depth 1 + writing + filling


def _stripe(job: Job, rows: tuple[int, int] | None, spec, scale: torch.Tensor | None, f32: torch.Tensor,
            out: torch.Tensor) -> None:
    """Rows of one output tensor: read, (4-bit round trip), fold, check, cast into `out`. Single-threaded."""
    from exporter.merge import quant4

    with quant4.serial():
        src = read_job_rows(job, rows)
        if job.quantized:
            quant4.round_trip(src, spec, out=f32, scale=scale)
        else:
            f32.copy_(src)
        r0, r1 = rows or (0, job.shape[0] if job.shape else 0)
        for t in job.terms:
            if t.transpose:
                fold(f32, t.a[:, r0:r1], t.b, t.scale, transpose=True)
            else:
                fold(f32, t.a, t.b[r0:r1], t.scale)
        for lb, s in job.bias_adds:
            f32.add_(lb, alpha=s)
        lo, hi = (f32.amin(), f32.amax()) if f32.numel() else (torch.zeros(()), torch.zeros(()))
        if not (torch.isfinite(lo) and torch.isfinite(hi)):  # min and max propagate NaN: two cheap passes
            raise LoraxError(f"merged tensor {job.name} has NaN/Inf values; the adapter (or base) weights are "
                             "broken, so nothing was written")
        if out is not f32:
            # The cast overflows exactly when the extreme values do (isfinite().all() on all was 15x slower).
            if not torch.isfinite(torch.stack([lo, hi]).to(out.dtype)).all():
                raise LoraxError(f"merged tensor {job.name} overflows {str(out.dtype).removeprefix('torch.')}; "
                                 "use --dtype float32 (or bfloat16)")
            out.copy_(f32)


def merge_job(job: Job, ctx: _Ctx, emit) -> None:
    """Stream one output tensor chunk by chunk into emit(); each chunk's rows are split over the cores."""
    from exporter.merge import quant4

    spec = ctx.spec
    target = ctx.out_dtype if job.dtype.is_floating_point else job.dtype
    untouched = not (job.quantized or job.terms or job.bias_adds) and target == job.dtype
    align = 1
    if job.quantized:
        row_elems = math.prod(job.shape[1:]) if len(job.shape) > 1 else 1
        align = spec.blocksize // math.gcd(row_elems, spec.blocksize)  # stripes hold whole 4-bit blocks
    ranges = row_ranges(job, align)
    scale = None
    if job.quantized and spec.double_quant:  # double quant scales depend on every block's absmax
        def absmax(rows):
            with quant4.serial():
                return quant4.block_absmax(read_job_rows(job, rows), spec)

        scale = quant4.effective_absmax(torch.cat(list(ctx.pool.map(absmax, ranges))), spec)
    for rows in ranges:
        if untouched or not job.dtype.is_floating_point:  # copied as stored
            src = read_job_rows(job, rows)
            if job.dtype.is_floating_point and not _finite(src):
                raise LoraxError(f"base tensor {job.name} has NaN/Inf values; the base checkpoint is broken")
            emit(job.name, src)
            continue
        r0, r1 = rows or (0, job.shape[0] if job.shape else 0)
        shape = (r1 - r0, *job.shape[1:]) if job.shape else ()
        out = ctx.ring.get(shape, target)
        f32 = out if target == torch.float32 else ctx.scratch.get(shape, torch.float32)
        if rows is None or r1 - r0 < 2 * align:
            _stripe(job, rows, spec, scale, f32, out)
        else:
            row_elems = math.prod(job.shape[1:])
            cuts = [r0 + (r1 - r0) * i // ctx.workers // align * align for i in range(ctx.workers)] + [r1]
            futures = []
            for a, b in zip(cuts, cuts[1:], strict=False):
                if b > a:
                    sc = None if scale is None else scale[a * row_elems // spec.blocksize:b * row_elems // spec.blocksize]
                    futures.append(ctx.pool.submit(_stripe, job, (a, b), spec, sc, f32[a - r0:b - r0], out[a - r0:b - r0]))
            for fut in futures:
                fut.result()
        emit(job.name, out)


def write_weights(plan: Plan, info: AdapterInfo, out_dir: Path, out_dtype: torch.dtype, max_shard_bytes: int,
                  progress: bool = True) -> dict[str, str]:
    """Run every job into sharded safetensors under out_dir; returns {file name: sha256}.

    Torch ops run single-threaded on one worker per core (per-op OpenMP fork/join stalls on a busy
    machine), and a writer thread writes and hashes chunk k while the workers compute chunk k + 1."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from exporter.merge import quant4
    from formats.hf.writer import AsyncWriter, ShardedWriter, TensorSpec

    spec = info.trained_on.quant_spec() if info.trained_on.quantized else None
    specs = [TensorSpec(j.name, out_dtype if j.dtype.is_floating_point else j.dtype, j.shape) for j in plan.jobs]
    writer = AsyncWriter(ShardedWriter(out_dir, specs, max_shard_bytes))
    with quant4.single_threaded_ops() as cores, ThreadPoolExecutor(cores) as pool, \
            tqdm(plan.jobs, desc="merge", unit="tensor", disable=not progress) as bar:  # closes before errors print
        ctx = _Ctx(spec, out_dtype, pool, cores)
        try:
            for job in bar:
                merge_job(job, ctx, writer.write)
            return writer.close()
        finally:
            writer.abort()


def resolve_merge_base(requested: str | None, info: AdapterInfo) -> str:
    """Default: the base as trained. `quantized` means nothing for an adapter trained without 4-bit."""
    if requested is None:
        return "quantized" if info.trained_on.quantized else "original"
    if requested not in MERGE_BASES:
        raise LoraxError(f"--merge-base {requested!r} is not one of {', '.join(MERGE_BASES)}")
    if not info.trained_on.quantized and requested == "quantized":
        raise LoraxError(f"{info.adapter_dir} was trained on an unquantized base, so --merge-base quantized "
                         "does not apply; drop the flag (original is exact here)")
    if not info.trained_on.quantized and requested == "auto":
        info.notes.append("--merge-base auto on an adapter trained without 4-bit: both bases are the original")
        return "original"
    return requested


def verify_base(info: AdapterInfo, stop: threading.Event | None = None) -> None:
    """Refuse a base whose weight files changed since training (lorax.json records their sha256)."""
    from lorax_common.hashing import sha256_file

    for name, digest in ((info.lorax.base if info.lorax else {}).get("files") or {}).items():
        path = info.base_dir / name
        actual = sha256_file(path, stop) if path.exists() else None
        if stop and stop.is_set():
            return
        if actual != digest:
            raise LoraxError(f"base file {path} is missing or differs from the one the adapter was trained on "
                             "(sha256 in lorax.json); merge against that exact base, or pass --no-verify-base")


def default_dtype(info: AdapterInfo) -> str:
    """The dtype training computed in: a QLoRA step runs dequant(NF4(W)) + B@A in the compute dtype, so only
    that dtype holds the trained model exactly (SmolLM2 QLoRA, a bf16 merge of a float32-computed run: mean
    KLD 3.6e-3, p99 0.056 against the trained model). Smaller storage is opt-in with --dtype, and gated."""
    t = info.trained_on
    return t.compute_dtype if t.quantized else t.load_dtype


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, merge_base: str | None = None,
                  dtype: str | None = None, trained_on: str | None = None, double_quant: bool = False,
                  base_dir: str | Path | None = None, force: bool = False, verify: bool = True,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                  adapter_weights: bool = True) -> Path:
    """Merge an adapter into full weights at out_dir (complete or absent: built aside, renamed at the end).

    `adapter_weights=False` writes the base exactly as training computed with it and nothing of the adapter
    (the gate's quantization floor, exporter.gate.floor, quantizes it)."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from exporter.gate.reference import FLOAT_DTYPES, base_layout, read_adapter
    from exporter.merge.io import base_tensors, write_support_files
    from formats.fsutil import atomic_dir, refuse_existing
    from lorax_common.outputs import output_lock, refuse_overlap

    out_dir = Path(out_dir)
    info = read_adapter(adapter_dir, trained_on, double_quant, base_dir)
    # --force replaces the output, never an input: `--out base/` would delete the base mid-merge
    refuse_overlap(out_dir, [info.adapter_dir, info.base_dir])
    refuse_existing(out_dir, force)  # before any heavy work; atomic_dir checks again
    with output_lock(out_dir) as lock:  # for the whole run: a second merge to the same --out fails at once
        mode = resolve_merge_base(merge_base, info)
        out_dtype = dtype or default_dtype(info)
        if out_dtype not in FLOAT_DTYPES:
            raise LoraxError(f"--dtype {out_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        adapter = load_file(info.adapter_dir / "adapter_model.safetensors") if adapter_weights else {}
        base = base_tensors(info.base_dir)
        layout = base_layout(info.base_dir, info.trained_on)
        # Every refusal the plan can raise happens here, before anything is written.
        plans = {m: build_plan(info, adapter, base, layout, m)
                 for m in (("quantized", "original") if mode == "auto" else (mode,))}
        torch_dtype = getattr(torch, out_dtype)
        # Hashing the base overlaps the merge (hashlib and file reads release the GIL); checked before the rename.
        checker, stop = ThreadPoolExecutor(1, thread_name_prefix="lorax-verify"), threading.Event()
        verified = checker.submit(verify_base, info, stop) if verify else None
        try:
            with atomic_dir(out_dir, force, lock=lock) as tmp:
                dirs = {m: (tmp / f".candidate-{m}" if mode == "auto" else tmp) for m in plans}
                digests = {}
                for m, plan in plans.items():
                    dirs[m].mkdir(exist_ok=True)
                    digests[m] = write_weights(plan, info, dirs[m], torch_dtype, max_shard_bytes, progress)
                    write_support_files(info, dirs[m], out_dtype, plan.untied)
                if verified is not None:
                    verified.result()
                _finish(info, mode, merge_base, out_dtype, plans, dirs, digests, tmp)
        finally:
            stop.set()  # a failed merge does not wait for the hash
            checker.shutdown(wait=False, cancel_futures=True)
    return out_dir


def _finish(info: AdapterInfo, mode: str, requested: str | None, out_dtype: str, plans: dict[str, Plan],
            dirs: dict[str, Path], digests: dict[str, dict[str, str]], tmp: Path) -> None:
    """Keep the chosen candidate (auto: the one closer to the trained model) and write lorax.json."""
    from exporter.gate.reference import score_candidates
    from exporter.merge.io import lorax_record

    chosen = mode
    merge: dict[str, Any] = {"merge_base": mode, "requested": requested or "default", "dtype": out_dtype}
    if mode == "auto":
        scores = score_candidates(info, dirs)
        chosen = min(scores, key=lambda m: (scores[m]["kld_mean"], -scores[m]["top1"]))
        for p in dirs[chosen].iterdir():
            p.rename(tmp / p.name)
        for d in dirs.values():
            shutil.rmtree(d)
        merge.update(merge_base=chosen, candidates=scores)
    merge.update(counts=plans[chosen].counts, untied_embeddings=plans[chosen].untied, notes=info.notes)
    record = lorax_record(info, tmp, merge, digests[chosen])
    (tmp / "lorax.json").write_text(json.dumps(record, indent=2) + "\n")
