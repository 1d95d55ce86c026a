"""The state `lorax export` leaves in dist/: built and gated, or built with the gate still to run.

    lorax export adapter/ --out dist/ --gguf     # killed during the gate: dist/lorax.json says "pending"
    lorax export adapter/ --out dist/ --gguf     # the same command again: runs the gate on dist/ and finishes

dist/ is published (renamed into place) only when every writer succeeded, with
`lorax.json: "gate": {"status": "pending", "artifacts": [...]}`; the verdict replaces that atomically when
the gate ends. A rerun with the same build settings finds "pending" (or "skipped", after --no-check) and
gates the files already there instead of refusing the existing dir; other settings are refused, and
--force rebuilds. Build staging of a killed run is swept when the next run takes the output lock
(lorax_common.outputs), so whatever a kill leaves, the next run finishes it or starts clean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from exporter.errors import LoraxError
from lorax_common.files import read_json_object

# gate states a rerun of the same export may complete (skipped: built with --no-check)
RESUMABLE = ("pending", "skipped")


def export_inputs(source: Path, opts) -> list[Path | str | None]:
    """Everything an export reads, so --out can be refused when it would overwrite one of them."""
    inputs: list[Path | str | None] = [source, opts.base, opts.prompts]
    if (source / "adapter_config.json").is_file():
        from exporter.gate.reference import read_adapter

        inputs.append(read_adapter(source, opts.trained_on, base_dir=opts.base).base_dir)
    return inputs


def request_of(source: Path, opts) -> dict[str, Any]:
    """The settings that decide what a build writes (gate settings may differ between runs)."""
    return {"source": str(source.resolve()), "gguf": opts.gguf,
            "quants": sorted({q.strip().lower() for q in opts.quants}) if opts.gguf else [],
            "gguf_adapter": opts.gguf_adapter, "onnx": opts.onnx, "onnx_dtype": opts.onnx_dtype,
            "onnx_quant": opts.onnx_quant, "merge_base": opts.merge_base, "trained_on": opts.trained_on,
            "double_quant": opts.double_quant,
            "base": str(Path(opts.base).resolve()) if opts.base else None, "dtype": opts.dtype,
            **{k: getattr(opts, k, None) for k in ("imatrix", "calibration", "imatrix_tokens", "max_kld", "max_size")},
            "tensor_types": list(getattr(opts, "tensor_types", ())), "output_type": getattr(opts, "output_type", None),
            "embedding_type": getattr(opts, "embedding_type", None)}


def pending(artifacts: list[Path], out_dir: Path, check: bool) -> dict[str, Any]:
    return {"status": "pending" if check else "skipped",
            "artifacts": [str(a.relative_to(out_dir)) for a in artifacts]}


def pending_gate(out_dir: Path, source: Path, opts) -> list[Path] | None:
    """The artifacts of an earlier run of this export whose gate never ran, or None (build anew)."""
    meta_path = out_dir / "lorax.json"
    if opts.force or not opts.check or not meta_path.is_file():
        return None
    meta = read_json_object(meta_path, "the record of an earlier `lorax export`")
    gate = meta.get("gate") if isinstance(meta.get("gate"), dict) else {}
    if meta.get("kind") != "export" or gate.get("status") not in RESUMABLE:
        return None  # a finished or foreign dir: the existence check refuses it
    changed = sorted(k for k, v in request_of(source, opts).items() if (meta.get("request") or {}).get(k) != v)
    if changed:
        raise LoraxError(f"{out_dir} holds an export whose gate has not run, built with other settings "
                         f"({', '.join(changed)}); rerun the command that built it to finish it, or pass --force "
                         "to rebuild")
    artifacts = [out_dir / a for a in gate.get("artifacts") or []]
    missing = [str(a) for a in artifacts if not a.exists()]
    if missing or not artifacts:
        raise LoraxError(f"{out_dir} is an unfinished export missing {', '.join(missing) or 'its artifact list'}; "
                         "pass --force to rebuild it")
    return artifacts


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace a JSON file whole (a kill leaves the old or the new one, never half of either)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
