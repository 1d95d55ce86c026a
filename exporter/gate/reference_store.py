"""Reference outputs computed once and reused: a second `lorax check` of the same build runs only the targets.

    lorax export adapter/ --out dist --gguf          # the gate computes the reference, stores its outputs
    lorax check adapter/ dist/model-q8_0.gguf         # "reference: reused the outputs stored ..." (no model load)
    LORAX_REFERENCE_CACHE=off lorax check ...         # always recompute (or --fresh-reference)

What the reference produces on the gate's samples (teacher-forced float32 logits at every position,
greedy generations) depends only on: the reference's files (adapter weights and config by sha256; the
base's weight files by size and mtime, its config by content), how the base is loaded (the
quantization training used), the samples (token ids, prompts, generation budgets) and the numeric stack
(lorax, torch, transformers, peft, bitsandbytes versions, and lorax's own source files, so a changed
checkout never reads what older code stored). `reference_key` hashes exactly those; any
change is a new key, so a stale entry is never read. The logits are stored whole, in float32, as one
.npy that is memory-mapped on reuse: the metrics are then computed from the very numbers a fresh run
would have used (top-k log-probs would make KLD an approximation; the full array costs positions x
vocab x 4 bytes, ~0.3 GB for the demo). Entries live under $LORAX_CACHE/reference, written aside and
renamed whole; the oldest are removed past LORAX_REFERENCE_CACHE_BYTES (default 8 GiB).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 8 * 2**30
FORMAT_VERSION = 1
# the packages whose numerics the reference's outputs depend on
NUMERIC_PACKAGES = ("lorax", "torch", "transformers", "peft", "bitsandbytes", "numpy")
# lorax's own packages whose code computes the outputs (hashed into every key, see code_identity)
CODE_PACKAGES = ("exporter", "formats", "lorax_common", "train")


def store_dir() -> Path | None:
    """Where entries live; None when reuse is switched off (LORAX_REFERENCE_CACHE=off)."""
    from lorax_common.cache import cache_dir

    setting = os.environ.get("LORAX_REFERENCE_CACHE", "")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    return Path(setting) if setting and setting.lower() not in ("on", "1", "yes", "true") else cache_dir() / "reference"


def _budget() -> int:
    try:
        return int(os.environ.get("LORAX_REFERENCE_CACHE_BYTES", DEFAULT_BUDGET_BYTES))
    except ValueError:
        return DEFAULT_BUDGET_BYTES


def file_identity(path: Path, by_content: bool) -> list:
    """A file as the key sees it: its sha256 (small files, or where content must decide) or size + mtime."""
    from lorax_common.hashing import sha256_file

    st = path.stat()
    return [path.name, sha256_file(path)] if by_content else [path.name, st.st_size, st.st_mtime_ns]


def dir_identity(folder: Path) -> list:
    """A model dir as the key sees it: its path, its config by sha256 and its weight files by size + mtime
    (re-hashing an 8B base on every check would cost what the store saves)."""
    from lorax_common.files import weight_files

    folder = Path(folder)
    out: list = [str(folder.resolve())]
    if (folder / "config.json").is_file():
        out.append(file_identity(folder / "config.json", by_content=True))
    out += [file_identity(f, by_content=False) for f in sorted(weight_files(folder), key=lambda f: f.name)]
    return out


def samples_identity(yard) -> str:
    """The samples exactly as the gate runs them: ids, prompt ids and each generation budget."""
    from exporter.gate.evaluate import gen_budget

    h = hashlib.sha256()
    for s in yard.samples:
        h.update(json.dumps([s.ids, s.prompt_ids, gen_budget(s, yard.tokenizer, yard.gen_tokens)]).encode())
    return h.hexdigest()


@functools.cache
def code_identity() -> str:
    """sha256 over lorax's own source files: a checkout whose code changed (the version string often does
    not, between releases) never reads outputs an older reference path stored."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def reference_key(reference_identity: Any, yard) -> str:
    from formats.hf.bf16_compute import native_bf16
    from lorax_common.versions import package_versions

    versions = {k: v for k, v in package_versions().items() if k in NUMERIC_PACKAGES}
    # the CPU's bf16 decides the reference's bf16 arithmetic (fast_reference.prepare)
    blob = json.dumps({"format": FORMAT_VERSION, "reference": reference_identity, "samples": samples_identity(yard),
                       "gen_tokens": yard.gen_tokens, "versions": versions, "code": code_identity(),
                       "native_bf16": native_bf16()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Stored:
    """What an entry gives back: the outputs, how the reference computed them, when, and in how long."""

    logits: list[np.ndarray]
    generations: list[list[int]]
    reference_path: dict
    created: str
    seconds: float
    path: Path


def load(key: str) -> Stored | None:
    """The entry for `key`, its logits memory-mapped; None when absent or unreadable (then recomputed)."""
    root = store_dir()
    if root is None or not (root / key / "meta.json").is_file():
        return None
    entry = root / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        flat = np.load(entry / "logits.npy", mmap_mode="r")
        bounds = np.cumsum([0, *meta["lengths"]])
        if flat.shape[0] != bounds[-1] or meta.get("format") != FORMAT_VERSION:
            return None
        os.utime(entry)  # recently used: the last to be evicted
    except (OSError, ValueError, KeyError) as e:
        log.warning("reference outputs in %s are unreadable (%s); recomputing them", entry, e)
        return None
    logits = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return Stored(logits, meta["generations"], meta.get("reference_path", {}), meta.get("created", "?"),
                  float(meta.get("seconds", 0.0)), entry)


def save(key: str, logits: list[np.ndarray], generations: list[list[int]], reference_path: dict,
         seconds: float) -> Path | None:
    """Write an entry aside and rename it into place; a full disk or a read-only cache only costs the reuse."""
    from datetime import UTC, datetime

    root = store_dir()
    if root is None:
        return None
    need = sum(lg.nbytes for lg in logits)
    if need > _budget():
        log.info("reference outputs (%.0f MB) exceed LORAX_REFERENCE_CACHE_BYTES; not stored", need / 1e6)
        return None
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
        flat = np.lib.format.open_memmap(tmp / "logits.npy", mode="w+", dtype=np.float32,
                                         shape=(sum(lg.shape[0] for lg in logits), logits[0].shape[-1]))
        row = 0
        for lg in logits:  # row by row into the mapped file: no second copy of every logit in memory
            flat[row:row + lg.shape[0]] = lg
            row += lg.shape[0]
        flat.flush()
        del flat
        meta = {"format": FORMAT_VERSION, "lengths": [int(lg.shape[0]) for lg in logits],
                "generations": [list(map(int, g)) for g in generations], "reference_path": reference_path,
                "created": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": round(seconds, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if not (root / key).exists():  # a concurrent gate of the same build may have stored it first
            os.replace(tmp, root / key)
            tmp = None
    except OSError as e:
        log.warning("could not store the reference outputs under %s (%s); the next check recomputes them", root, e)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    evict(root, _budget(), keep=key)
    return root / key


def evict(root: Path, budget: int, keep: str) -> None:
    """Remove the least recently used entries until the store fits `budget` bytes (never `keep`)."""
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in entries}
    total = sum(sizes.values())
    for p in sorted(entries, key=lambda p: p.stat().st_mtime):
        if total <= budget:
            break
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]


def describe(stored: Stored) -> str:
    return (f"reused the outputs stored {stored.created} ({stored.path}); "
            f"{stored.seconds:.0f} s of reference computation skipped")


@dataclass(frozen=True)
class ReferenceSource:
    """The model as trained, not loaded yet: its name, tokenizer, what its outputs depend on, how to open it."""

    name: str
    tokenizer: Any
    identity: Any  # JSON-able: the files and settings that determine its outputs (see the module docstring)
    open: Callable[[], Any]  # -> a formats.runner.Runner


def reference_outputs(ref: ReferenceSource, yard, reuse: bool = True, candidates: list[list[int]] | None = None,
                      proxy: str | None = None):
    """(RefOutputs, reference_path dict): stored outputs when an entry matches, else computed (then stored).
    A fresh computation loads the reference, dequantizes its 4-bit layers once where proven bit-identical
    (exporter.gate.fast_reference.prepare; bf16 products accumulated in float32 without native bf16), runs
    every sample and closes it before the next target is opened.
    `candidates`: the greedy tokens of target `proxy`, which the reference checks in one forward instead of
    decoding its own (evaluate.verified_generations: the result is the reference's own greedy answer)."""
    from exporter.gate.evaluate import RefOutputs, run_reference
    from exporter.gate.fast_reference import prepare
    from lorax_common.memory import release

    key = reference_key(ref.identity, yard) if reuse and store_dir() is not None else None
    stored = load(key) if key else None
    if stored is not None:
        log.info("reference: %s", describe(stored))
        outputs = {"reused": True, "key": key, "stored": str(stored.path), "created": stored.created,
                   "seconds_skipped": stored.seconds}
        return RefOutputs(stored.logits, stored.generations, key), {**stored.reference_path, "outputs": outputs}
    t0 = time.perf_counter()
    runner = ref.open()
    try:
        path = prepare(runner, yard.samples[0].ids)
        out = run_reference(runner, yard, candidates)
    finally:
        runner.close()  # only its outputs are needed from here on: peak memory is one model at a time
        release()
    if out.generation is not None:
        path = {**path, "generation": {"checked": proxy, **out.generation}}
    if key is None:
        return out, {**path, "outputs": {"reused": False, "stored": None}}
    saved = save(key, out.logits, out.generations, path, time.perf_counter() - t0)
    if saved is not None:
        out = RefOutputs(out.logits, out.generations, key)
    return out, {**path, "outputs": {"reused": False, "key": key, "stored": str(saved) if saved else None}}


# ------------------------------------------------------------------------- measurements beside the outputs


def measurement_name(kind: str, *parts: Any) -> str:
    """A remembered measurement's name within an entry: its kind and a hash of what else it depends on, with
    every runtime's version (the entry's key covers only the reference's stack; a control or floor also runs
    the writers and their clients: gguf, llama-cpp-python, onnx, onnxruntime)."""
    from lorax_common.versions import package_versions

    blob = json.dumps([parts, package_versions()], sort_keys=True, default=str)
    return f"{kind}-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def recall(key: str | None, name: str) -> dict | None:
    """A measurement made from the outputs stored under `key` (the control's or a floor's metrics), or None.
    The entry's key already covers the adapter, base, samples, versions and lorax's code; `name` the rest."""
    root = store_dir()
    path = root / key / "measured" / f"{name}.json" if key and root is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remember(key: str | None, name: str, value: dict) -> None:
    """Store `value` beside the outputs of `key` (written aside, renamed; a failure only costs the reuse)."""
    root = store_dir()
    if not key or root is None or not (root / key).is_dir():
        return
    folder = root / key / "measured"
    try:
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, folder / f"{name}.json")
    except OSError as e:
        log.warning("could not remember %s under %s (%s)", name, folder, e)
