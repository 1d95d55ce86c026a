"""What `lorax train` records in the adapter's `lorax.json` (the schema: lorax_common.record).

    lorax train ... --out adapter/      # writes adapter/lorax.json

The base's identity is lorax_common.hashing.weights_digest over its weight files, which a user can check
with coreutils: `cd base/ && sha256sum *.safetensors | sha256sum`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorax_common import record
from lorax_common.hashing import sha256_file, weights_digest
from lorax_common.record import AdapterRecord, Quantization
from lorax_common.versions import LORAX_VERSION, package_versions

# weight files, in order of preference: the first pattern that matches names the base's weights
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


def weight_files(base: Path) -> list[Path]:
    for pattern in WEIGHT_GLOBS:
        files = sorted(base.glob(pattern))
        if files:
            return files
    return []


def base_record(base: Path, storage_dtype: str, architecture: str, hub_id: str | None = None) -> dict[str, Any]:
    from lorax_common.log import progress

    files = {p.name: sha256_file(p) for p in progress(weight_files(base), desc="hash base weights", leave=False)}
    record = {"path": str(base.resolve()), "weights_sha256": weights_digest(files), "files": files,
              "storage_dtype": storage_dtype, "architecture": architecture}
    if hub_id:
        record["hub_id"] = hub_id
    return record


def build(*, base: dict, quantization: dict, lora: dict, data: dict, seed: int, training: dict,
          metrics: dict) -> AdapterRecord:
    """The record of a finished run (lorax_common.record validates the quantization it is given)."""
    return AdapterRecord(base=base, quantization=Quantization.from_dict(quantization), lora=lora, data=data,
                         seed=seed, training=training, metrics=metrics, versions=package_versions(),
                         lorax_version=LORAX_VERSION, created=record.now())
