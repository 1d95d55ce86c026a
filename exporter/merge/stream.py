"""Executing a merge plan (`lorax merge ADAPTER --out DIR`, step 2 of 2): stream the base, write shards.

    digests = write_weights(plan, info, out_dir, torch.float32, max_shard_bytes=5 * 1024**3)

Each output tensor is read in row chunks (exporter.merge.io), round-tripped through 4 bits where the plan
says training saw it that way (exporter.merge.quant4), the LoRA terms folded in float32, checked for
NaN/Inf and cast; peak memory is a few chunks, not the model. The rows of a chunk are split over one
worker per core with torch single-threaded inside, and a writer thread writes and hashes chunk k while
the workers compute chunk k + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.errors import LoraxError
from exporter.gate.reference import AdapterInfo
from exporter.merge.io import Buffers, read_job_rows, row_ranges
from exporter.merge.plan import Job, Plan, fold
from lorax_common.log import progress


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
                  show_progress: bool = True) -> dict[str, str]:
    """Run every job into sharded safetensors under out_dir; returns {file name: sha256}.

    Torch ops run single-threaded on one worker per core (per-op OpenMP fork/join stalls on a busy
    machine), and a writer thread writes and hashes chunk k while the workers compute chunk k + 1."""
    from concurrent.futures import ThreadPoolExecutor

    from exporter.merge import quant4
    from formats.hf.writer import AsyncWriter, ShardedWriter, TensorSpec

    spec = info.trained_on.quant_spec() if info.trained_on.quantized else None
    specs = [TensorSpec(j.name, out_dtype if j.dtype.is_floating_point else j.dtype, j.shape) for j in plan.jobs]
    writer = AsyncWriter(ShardedWriter(out_dir, specs, max_shard_bytes))
    with quant4.single_threaded_ops() as cores, ThreadPoolExecutor(cores) as pool, \
            progress(plan.jobs, desc="merge", unit="tensor", enabled=show_progress) as bar:  # closes before errors print
        ctx = _Ctx(spec, out_dtype, pool, cores)
        try:
            for job in bar:
                merge_job(job, ctx, writer.write)
            return writer.close()
        finally:
            writer.abort()
