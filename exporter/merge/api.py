"""`lorax merge ADAPTER --out DIR`: fold a LoRA adapter into full weights, exactly as it was trained.

    lorax merge adapter/ --out merged/                        # QLoRA adapter: --merge-base quantized
    lorax merge adapter/ --out merged/ --merge-base auto      # build both bases, keep the closer one
    lorax merge peft_dir/ --out merged/ --trained-on nf4      # a plain PEFT adapter (no lorax.json)

    from exporter.merge.api import MergeOptions, merge_adapter    # what `lorax export` and the gate call
    merge_adapter("adapter/", "merged/", MergeOptions(dtype="float32"))

Plan first (exporter.merge.plan: every refusal before a byte is written), then execute
(exporter.merge.stream) into a temp dir that is renamed to DIR only when complete; the base's sha256
against lorax.json is checked on a side thread while the merge runs.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.errors import LoraxError
from exporter.gate.reference import AdapterInfo
from exporter.merge.plan import Plan, build_plan, default_dtype, resolve_merge_base
from exporter.merge.stream import write_weights
from lorax_common.record import FLOAT_DTYPES

DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class MergeOptions:
    """How to merge; the defaults are the exact merge of a lorax-trained adapter."""

    merge_base: str | None = None  # quantized | original | auto; None: the base as trained
    dtype: str | None = None  # None: the dtype training computed in (exporter.merge.plan.default_dtype)
    trained_on: str | None = None  # for adapters without lorax.json: nf4 | fp4 | none
    double_quant: bool = False  # with trained_on nf4/fp4
    base_dir: str | Path | None = None  # None: the base recorded in the adapter
    force: bool = False  # replace an existing output (never an input)
    verify: bool = True  # check the base's sha256 against lorax.json
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = True
    # False: the base exactly as training computed with it, nothing of the adapter (the gate's floor)
    adapter_weights: bool = True


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


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, opts: MergeOptions = MergeOptions()) -> Path:
    """Merge an adapter into full weights at out_dir (complete or absent: built aside, renamed at the end).

    `opts.adapter_weights=False` writes the base exactly as training computed with it and nothing of the
    adapter (the gate's quantization floor, exporter.gate.floor, quantizes it)."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from exporter.gate.reference import base_layout, read_adapter
    from exporter.merge.io import base_tensors, write_support_files
    from formats.fsutil import atomic_dir, refuse_existing
    from lorax_common.outputs import output_lock, refuse_overlap

    out_dir = Path(out_dir)
    info = read_adapter(adapter_dir, opts.trained_on, opts.double_quant, opts.base_dir)
    # --force replaces the output, never an input: `--out base/` would delete the base mid-merge
    refuse_overlap(out_dir, [info.adapter_dir, info.base_dir])
    refuse_existing(out_dir, opts.force)  # before any heavy work; atomic_dir checks again
    with output_lock(out_dir) as lock:  # for the whole run: a second merge to the same --out fails at once
        mode = resolve_merge_base(opts.merge_base, info)
        out_dtype = opts.dtype or default_dtype(info)
        if out_dtype not in FLOAT_DTYPES:
            raise LoraxError(f"--dtype {out_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        adapter = load_file(info.adapter_dir / "adapter_model.safetensors") if opts.adapter_weights else {}
        base = base_tensors(info.base_dir)
        layout = base_layout(info.base_dir, info.trained_on)
        # Every refusal the plan can raise happens here, before anything is written.
        plans = {m: build_plan(info, adapter, base, layout, m)
                 for m in (("quantized", "original") if mode == "auto" else (mode,))}
        torch_dtype = getattr(torch, out_dtype)
        # Hashing the base overlaps the merge (hashlib and file reads release the GIL); checked before the rename.
        checker, stop = ThreadPoolExecutor(1, thread_name_prefix="lorax-verify"), threading.Event()
        verified = checker.submit(verify_base, info, stop) if opts.verify else None
        try:
            with atomic_dir(out_dir, opts.force, lock=lock) as tmp:
                dirs = {m: (tmp / f".candidate-{m}" if mode == "auto" else tmp) for m in plans}
                digests = {}
                for m, plan in plans.items():
                    dirs[m].mkdir(exist_ok=True)
                    digests[m] = write_weights(plan, info, dirs[m], torch_dtype, opts.max_shard_bytes, opts.progress)
                    write_support_files(info, dirs[m], out_dtype, plan.untied)
                if verified is not None:
                    verified.result()
                _finish(info, mode, opts.merge_base, out_dtype, plans, dirs, digests, tmp)
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
