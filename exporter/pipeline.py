"""`lorax export`: merge -> each format's writer -> parity gate, in one command.

    lorax export adapter/ --out dist/ --gguf --quant q8_0 --quant q4_k_m --onnx

Output layout:
    dist/merged/            the merged HF model (skipped when the source is already an HF model dir)
    dist/model-<type>.gguf  one per --quant (several types share one intermediate)
    dist/onnx/              ONNX decoder with KV cache (+ config/tokenizer files)
    dist/report.{json,md}   the gate's verdict on every artifact, kld.svg
    dist/lorax.json         what was built from what, with sha256 of every file

Artifacts are built in a temp dir that becomes `dist/` only when all writers succeeded; the gate
runs after that, so a failed gate leaves the files and the report for inspection (and exits 1).
`dist/` is locked for the whole run, must not overlap any input, and until the gate ends its lorax.json
says `"gate": {"status": "pending"}`: rerunning the same command after a kill finishes it
(exporter.publish).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from exporter import __version__
from exporter.errors import LoraxError
from exporter.publish import export_inputs, pending, pending_gate, request_of, write_json_atomic
from formats.fsutil import atomic_dir, sha256_file
from lorax_common.outputs import OutputLock, output_lock, refuse_overlap


@dataclass
class ExportOptions:
    gguf: bool = False
    quants: tuple[str, ...] = ()
    gguf_adapter: bool = False
    onnx: bool = False
    onnx_dtype: str = "float32"
    onnx_quant: str | None = None
    merge_base: str | None = None
    trained_on: str | None = None
    base: str | None = None
    dtype: str | None = None
    check: bool = True
    prompts: str | None = None
    max_samples: int | None = None
    gen_tokens: int = 16
    overrides: dict = field(default_factory=dict)
    floor: str = "auto"
    force: bool = False


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def export(source: str | Path, out_dir: str | Path, opts: ExportOptions):
    """Build every requested artifact, then gate them. Returns the gate Report (or None with --no-check)."""
    source, out_dir = Path(source), Path(out_dir)
    if not (opts.gguf or opts.onnx):
        raise LoraxError("nothing to export; pass --gguf and/or --onnx")
    if not source.is_dir():
        raise LoraxError(f"{source}: no such directory; pass an adapter dir (from lorax train) or an HF model dir")
    refuse_overlap(out_dir, export_inputs(source, opts))  # with or without --force
    with output_lock(out_dir) as lock:  # for the whole run: a second export to the same --out fails at once
        artifacts = pending_gate(out_dir, source, opts)  # a killed run's build whose gate never ran
        if artifacts is None:
            artifacts = build(source, out_dir, opts, lock)
        if not opts.check:
            return None
        return gate(source, out_dir, artifacts, opts)


def build(source: Path, out_dir: Path, opts: ExportOptions, lock: OutputLock) -> list[Path]:
    """Every writer into a staging dir that becomes out_dir whole; returns the artifacts to gate."""
    artifacts: list[Path] = []
    record: dict = {"kind": "export", "lorax_version": __version__, "source": str(source.resolve()),
                    "created": datetime.now(UTC).isoformat(timespec="seconds"), "artifacts": []}
    with atomic_dir(out_dir, force=opts.force, lock=lock) as tmp:
        if is_adapter(source):
            from exporter.merge import merge_adapter

            merge_adapter(source, tmp / "merged", merge_base=opts.merge_base, dtype=opts.dtype,
                          trained_on=opts.trained_on, base_dir=opts.base)
            merged_tmp, merged_final = tmp / "merged", out_dir / "merged"
            artifacts.append(merged_final)
        elif (source / "config.json").is_file():
            merged_tmp = merged_final = source
        else:
            raise LoraxError(f"{source}: neither an adapter dir (adapter_config.json) nor an HF model dir")
        if opts.gguf:
            from formats.gguf.export import export_gguf

            result = export_gguf(merged_tmp, tmp, opts.quants or ("q8_0",),
                                 adapter_dir=source if opts.gguf_adapter else None)
            for f in result:
                final = out_dir / f.path.name
                record["artifacts"].append({"format": "gguf", "kind": f.kind, "type": f.type,
                                            "path": final.name, "sha256": f.sha256})
                if f.kind == "model":
                    artifacts.append(final)
            record["warnings"] = list(result.warnings)
        if opts.onnx:
            from formats.onnx.export import export_onnx

            export_onnx(merged_tmp, tmp / "onnx", dtype=opts.onnx_dtype, quant=opts.onnx_quant)
            artifacts.append(out_dir / "onnx")
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and p.suffix != ".gguf" and p.name != "lorax.json":
                record.setdefault("files", {})[str(p.relative_to(tmp))] = sha256_file(p)
        record.update(request=request_of(source, opts), gate=pending(artifacts, out_dir, opts.check))
        (tmp / "lorax.json").write_text(json.dumps(record, indent=2) + "\n")
    return artifacts


def gate(source: Path, out_dir: Path, artifacts: list[Path], opts: ExportOptions):
    from exporter.check import check

    report = check(source, artifacts, base=opts.base, trained_on=opts.trained_on, prompts=opts.prompts,
                   report_dir=out_dir, gen_tokens=opts.gen_tokens, max_samples=opts.max_samples,
                   overrides=opts.overrides, raise_on_fail=False, floor=opts.floor)
    meta = json.loads((out_dir / "lorax.json").read_text())
    meta["gate"] = {"status": "passed" if report.passed else "failed", "passed": report.passed,
                    "report": "report.md", "targets": {t.name: t.passed for t in report.targets}}
    write_json_atomic(out_dir / "lorax.json", meta)  # a kill here leaves "pending", which a rerun finishes
    return report
