"""The adapter's `lorax.json`: everything merge and the parity gate need to rebuild the trained model.

    lorax train ... --out adapter/      # writes adapter/lorax.json

`weights_digest` is the base's identity: sha256 over `sha256sum`-style lines ("<hash>  <name>\\n")
of its weight files sorted by name, so a user can check it with coreutils:
    cd base/ && sha256sum *.safetensors | sha256sum
(the glob is sorted by name, as the lines are here).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata as md
from pathlib import Path
from typing import Any

LORAX_VERSION = "0.1.0"

# distributions whose versions decide the numbers (recorded for reproduction)
VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")

# weight files, in order of preference: the first pattern that matches names the base's weights
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(base: Path) -> list[Path]:
    for pattern in WEIGHT_GLOBS:
        files = sorted(base.glob(pattern))
        if files:
            return files
    return []


def weights_digest(file_hashes: dict[str, str]) -> str:
    """sha256 over "<hash>  <name>\\n" lines sorted by name (pure; the same as `sha256sum * | sha256sum`)."""
    lines = "".join(f"{file_hashes[name]}  {name}\n" for name in sorted(file_hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_tree(path: Path) -> str:
    """A data file's sha256, or for a datasets dir the digest of all its files (relative names)."""
    if path.is_file():
        return sha256_file(path)
    files = {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return weights_digest(files)


def base_record(base: Path, storage_dtype: str, architecture: str, hub_id: str | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    files = {p.name: sha256_file(p) for p in tqdm(weight_files(base), desc="hash base weights", leave=False)}
    record = {"path": str(base.resolve()), "weights_sha256": weights_digest(files), "files": files,
              "storage_dtype": storage_dtype, "architecture": architecture}
    if hub_id:
        record["hub_id"] = hub_id
    return record


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def build(*, base: dict, quantization: dict, lora: dict, data: dict, seed: int, training: dict,
          metrics: dict) -> dict[str, Any]:
    return {
        "kind": "adapter",
        "lorax_version": LORAX_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "base": base,
        "quantization": quantization,
        "lora": lora,
        "data": data,
        "seed": seed,
        "training": training,
        "versions": versions(),
        "metrics": metrics,
    }
