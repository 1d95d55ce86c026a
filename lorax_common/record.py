"""The adapter's `lorax.json`: the contract between `lorax train` (writes it) and merge / the gate (read it).

    lorax train ... --out adapter/          # writes adapter/lorax.json through AdapterRecord.to_dict
    lorax merge adapter/ --out merged/      # reads it back through AdapterRecord.from_dict

`schema_version` numbers the layout of the keys. A record without it was written before the field existed
(lorax 0.1.0, the same keys), so it reads as version 1; a newer version than this module knows is refused
with one line instead of being half-understood. `quantization` is typed because merge and the reference
rebuild the base from it; the other sections are recorded for people and reproduction and stay dicts.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorax_common.errors import UserError

SCHEMA_VERSION = 1
FILE = "lorax.json"
METHODS = ("bnb-4bit", "none")
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# what a base can have been trained on (the --trained-on choices for adapters without a record)
TRAINED_ON = (*QUANT_TYPES, "none")
# what the LoRA is folded into: the base as quantized in training, the original weights, or the closer one
MERGE_BASES = ("auto", "quantized", "original")
# keys that only mean something for a 4-bit base: a plain-LoRA record leaves them out
QUANT_ONLY = ("quant_type", "blocksize", "double_quant", "quant_storage")


@dataclass(frozen=True)
class Quantization:
    """How training loaded the base: bitsandbytes 4-bit settings as read back from the loaded layers."""

    method: str = "none"
    quant_type: str | None = None
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: str | None = None  # None: float32 for a 4-bit base, the stored dtype for plain LoRA
    quant_storage: str = "uint8"
    load_dtype: str | None = None  # the dtype bnb quantized from (defaults to compute_dtype)
    unquantized_dtype: str | None = None  # norms/embeddings after prepare_model_for_kbit_training
    torch_threads: int | None = None  # of the training process (see exporter.merge.quant4.Quant4Spec.threads)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = FILE) -> Quantization:
        if not isinstance(d, dict):
            raise UserError(f"{where}: quantization must be an object, not {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"{where}: unknown quantization key(s) {', '.join(sorted(unknown))}")
        q = cls(**d)
        if q.method not in METHODS:
            raise UserError(f"{where}: quantization.method {q.method!r} is unknown; expected 'bnb-4bit' or 'none'")
        if q.method == "bnb-4bit" and q.quant_type not in QUANT_TYPES:
            raise UserError(f"{where}: quantization.quant_type {q.quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
        for name in ("compute_dtype", "load_dtype", "unquantized_dtype"):
            value = getattr(q, name)
            if value is not None and value not in FLOAT_DTYPES:
                raise UserError(f"{where}: quantization.{name} {value!r} is not one of {', '.join(FLOAT_DTYPES)}")
        if not isinstance(q.blocksize, int) or not isinstance(q.double_quant, bool):
            raise UserError(f"{where}: quantization.blocksize must be an integer and double_quant true/false")
        return q

    def to_dict(self) -> dict[str, Any]:
        skip = QUANT_ONLY if self.method == "none" else ()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None and f.name not in skip}


@dataclass(frozen=True)
class AdapterRecord:
    """lorax.json of an adapter dir (`kind: adapter`)."""

    base: dict[str, Any]  # path, weights_sha256, files {name: sha256}, storage_dtype, architecture[, hub_id]
    quantization: Quantization
    lora: dict[str, Any]  # r, alpha, dropout, target_modules (resolved), use_rslora, modules_to_save
    data: dict[str, Any] = field(default_factory=dict)  # path, sha256, format, eval_file, ...
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    lorax_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = FILE) -> AdapterRecord:
        if d.get("kind") != "adapter":
            raise UserError(f"{where} has kind {d.get('kind')!r}, not 'adapter'; pass the adapter directory, "
                            "not a merged model")
        version = d.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UserError(f"{where} has schema_version {version!r}; this lorax reads up to {SCHEMA_VERSION} "
                            "(upgrade lorax)")
        for key in ("base", "quantization", "lora"):
            if not isinstance(d.get(key), dict):
                raise UserError(f"{where}: {key!r} is missing or not an object; re-run `lorax train`")
        if not isinstance(d["base"].get("path"), str):
            raise UserError(f"{where}: base.path is missing; re-run `lorax train` or pass --base")
        known = {f.name for f in fields(cls)}
        rest = {k: v for k, v in d.items() if k in known and k not in ("quantization", "schema_version")}
        return cls(quantization=Quantization.from_dict(d["quantization"], where), schema_version=version, **rest)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "adapter", "schema_version": self.schema_version}
        for f in fields(self):
            if f.name != "schema_version":
                out[f.name] = getattr(self, f.name)
        out["quantization"] = self.quantization.to_dict()
        return out


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write(adapter_dir: Path, record: AdapterRecord) -> Path:
    path = Path(adapter_dir) / FILE
    path.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return path


def read(adapter_dir: Path) -> AdapterRecord | None:
    """The adapter dir's record, None when it has no lorax.json (a plain PEFT dir); bad ones: one line."""
    from lorax_common.files import read_json_object

    path = Path(adapter_dir) / FILE
    if not path.exists():
        return None
    return AdapterRecord.from_dict(read_json_object(path, "the adapter's training record"), str(path))
