"""`lorax export`: merge -> each format's writer -> parity gate, in one command.

    lorax export adapter/ --out dist/ --gguf --quant q8_0 --quant q4_k_m --onnx

Output layout:
    dist/merged/            the merged HF model (skipped when the source is already an HF model dir)
    dist/model-<type>.gguf  one per --quant (several types share one intermediate)
    dist/model-lora-f32.gguf + dist/base-as-trained-<t>.gguf   with --gguf-adapter: the LoRA alone and the
                            base it was trained on (NF4-dequantized), gated together through llama.cpp
    dist/onnx/              ONNX decoder with KV cache (+ config/tokenizer files)
    dist/report.{json,md}   the gate's verdict on every artifact, kld.svg
    dist/README.md          a Hugging Face model card generated from the report (exporter.export.card)
    dist/lorax.json         what was built from what, with sha256 of every file

Artifacts are built in a temp dir that becomes `dist/` only when all writers succeeded; the gate
runs after that, so a failed gate leaves the files and the report for inspection (and exits 1).
`dist/` is locked for the whole run, must not overlap any input, and until the gate ends its lorax.json
says `"gate": {"status": "pending"}`: rerunning the same command after a kill finishes it
(exporter.export.publish).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from exporter.errors import LoraxError
from exporter.export.card import write_card
from exporter.export.publish import export_inputs, pending, pending_gate, request_of, write_json_atomic
from exporter.merge.api import MergeOptions
from formats.fsutil import atomic_dir
from lorax_common.hashing import sha256_file
from lorax_common.outputs import OutputLock, output_lock, refuse_overlap, scratch_dir
from lorax_common.timing import Stopwatch
from lorax_common.versions import LORAX_VERSION


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
    double_quant: bool = False
    base: str | None = None
    dtype: str | None = None
    check: bool = True
    prompts: str | None = None
    max_samples: int | None = None
    gen_tokens: int = 16
    overrides: dict = field(default_factory=dict)
    floor: str = "auto"
    force: bool = False
    imatrix: str = "auto"  # auto | off | a GGUF imatrix file (exporter.export.gguf_build)
    calibration: str | None = None
    imatrix_tokens: int | None = None  # None: auto (formats.gguf.imatrix.auto_token_budget)
    tensor_types: tuple[str, ...] = ()  # PATTERN=TYPE, as llama-quantize --tensor-type
    output_type: str | None = None
    embedding_type: str | None = None
    max_kld: float | None = None  # --quant auto budgets
    max_size: int | None = None
    reuse_reference: bool = True  # --fresh-reference: recompute the reference outputs

    def merge_options(self) -> MergeOptions:
        return MergeOptions(merge_base=self.merge_base, dtype=self.dtype, trained_on=self.trained_on,
                            double_quant=self.double_quant, base_dir=self.base)


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def validate(source: Path, opts: ExportOptions) -> ExportOptions:
    """Every refusal that needs no model: nothing is written before these pass."""
    from dataclasses import replace

    from exporter.gate.registry import lookup, normalise_quants
    from formats.archs import SUPPORTED, source_model_type, unsupported_message
    from formats.gguf.quantize import NEEDS_IMATRIX

    if not (opts.gguf or opts.onnx):
        raise LoraxError("nothing to export; pass --gguf and/or --onnx")
    if not source.is_dir():
        raise LoraxError(f"{source}: no such directory; pass an adapter dir (from lorax train) or an HF model dir")
    model_type = source_model_type(source)
    if model_type is not None and model_type not in SUPPORTED:  # before any merge, file or model load
        raise LoraxError(unsupported_message(model_type))
    if opts.gguf_adapter and not is_adapter(source):
        raise LoraxError(f"--gguf-adapter needs an adapter dir; {source} has no adapter_config.json")
    if opts.onnx:
        lookup("onnx", opts.onnx_quant or opts.onnx_dtype)
    quants = tuple(q.strip().lower() for q in opts.quants or ("q8_0",))
    if "auto" in quants and opts.max_kld is None and opts.max_size is None:
        raise LoraxError("--quant auto needs a budget: --max-kld X and/or --max-size SIZE")
    if opts.imatrix not in ("auto", "off") and not Path(opts.imatrix).is_file():
        raise LoraxError(f"--imatrix {opts.imatrix}: no such file (pass auto, off, or a GGUF imatrix file)")
    picked = normalise_quants([q for q in quants if q != "auto"]) + (("auto",) if "auto" in quants else ())
    needs = [q for q in picked if q in NEEDS_IMATRIX]
    if opts.gguf and needs and opts.imatrix == "off":
        raise LoraxError(f"--quant {needs[0]} needs an importance matrix; drop --imatrix off (auto computes it from "
                         "the training data) or pass --imatrix FILE")
    return replace(opts, quants=picked if opts.gguf else ())


def write_base_as_trained(source: Path, tmp: Path, opts: ExportOptions) -> Path:
    """The base exactly as training computed with it, as a GGUF of its exact type: what the LoRA GGUF must be
    applied to (a GGUF of the original base would give llama.cpp the naive merge)."""
    import shutil
    from dataclasses import replace

    from exporter.merge.api import merge_adapter
    from formats.gguf.export import GGUFOptions, export_gguf
    from formats.gguf.writer import source_type

    hf = tmp / ".base-as-trained"
    merge_adapter(source, hf, replace(opts.merge_options(), verify=False, progress=False, adapter_weights=False))
    try:
        out = export_gguf(hf, tmp, [source_type(hf)], GGUFOptions(stem="base-as-trained", check_tokenizer=False))
        return out.files[0].path
    finally:
        shutil.rmtree(hf, ignore_errors=True)


def export(source: str | Path, out_dir: str | Path, opts: ExportOptions):
    """Build every requested artifact, then gate them. Returns the gate Report (or None with --no-check)."""
    source, out_dir = Path(source), Path(out_dir)
    opts = validate(source, opts)
    refuse_overlap(out_dir, export_inputs(source, opts))  # with or without --force
    clock = Stopwatch()
    # for the whole run: a second export to the same --out fails at once
    with output_lock(out_dir) as lock, contextlib.ExitStack() as stack:
        # the build keeps files here that only the gate reads (the GGUF control); swept if the run is killed
        scratch = stack.enter_context(scratch_dir(out_dir)) if opts.check and opts.gguf else None
        artifacts, controls = pending_gate(out_dir, source, opts), {}  # a killed run's build whose gate never ran
        if artifacts is None:
            artifacts, controls = build(source, out_dir, opts, lock, clock, scratch)
        if not opts.check:
            return None
        return gate(source, out_dir, artifacts, opts, clock, controls)


def build(source: Path, out_dir: Path, opts: ExportOptions, lock: OutputLock, clock: Stopwatch,
          scratch: Path | None = None) -> tuple[list[Path], dict]:
    """Every writer into a staging dir that becomes out_dir whole; returns the artifacts to gate, and the
    lossless files of the merged weights the writers made on the way, kept in `scratch` for the gate's
    control (format -> (path, type)). Each stage's time goes to `clock` (and lorax.json's "timing")."""
    artifacts: list[Path] = []
    controls: dict[str, tuple[Path, str]] = {}
    record: dict = {"kind": "export", "lorax_version": LORAX_VERSION, "source": str(source.resolve()),
                    "created": datetime.now(UTC).isoformat(timespec="seconds"), "artifacts": []}
    with atomic_dir(out_dir, force=opts.force, lock=lock) as tmp:
        if is_adapter(source):
            from exporter.merge.api import merge_adapter

            with clock("merge"):
                merge_adapter(source, tmp / "merged", opts.merge_options())
            merged_tmp, merged_final = tmp / "merged", out_dir / "merged"
            artifacts.append(merged_final)
        elif (source / "config.json").is_file():
            merged_tmp = merged_final = source
        else:
            raise LoraxError(f"{source}: neither an adapter dir (adapter_config.json) nor an HF model dir")
        imx = None
        if opts.gguf:
            from exporter.export.gguf_build import build_gguf, recipe_record

            built = build_gguf(source, merged_tmp, tmp, opts, clock, keep_source=scratch)
            imx = built.imatrix
            result = built.result
            if result.source is not None:  # libllama's source: the exact type of the merged weights
                controls["gguf"] = (result.source.path, result.source.type)
            record.update(built.record)
            files = [(f.kind, f.type, f.path, f.sha256) for f in result]
            if opts.gguf_adapter:
                with clock("gguf base-as-trained"):
                    base_gguf = write_base_as_trained(source, tmp, opts)
                files.append(("base", base_gguf.stem.rsplit("-", 1)[1], base_gguf, sha256_file(base_gguf)))
            for kind, qtype, path, digest in files:
                record["artifacts"].append({"format": "gguf", "kind": kind, "type": qtype, "path": path.name,
                                            "sha256": digest,
                                            "recipe": recipe_record(built.recipes.get(qtype)) if kind == "model"
                                            else None})
                if kind in ("model", "base"):  # the base is gated with the LoRA applied (see gate())
                    artifacts.append(out_dir / path.name)
            record["warnings"] = list(result.warnings)
        if opts.onnx:
            from exporter.export.onnx_build import build_onnx
            from formats.onnx.bundle import graph_path, variants_in

            record.update(build_onnx(source, merged_tmp, tmp, imx, opts, clock))
            # every graph shipped is gated (an int4 export also holds the float32 graph it came from)
            artifacts += [graph_path(out_dir / "onnx", v) for v in variants_in(tmp / "onnx")]
        if digests := file_digests(tmp):
            record["files"] = digests
        record.update(request=request_of(source, opts), gate=pending(artifacts, out_dir, opts.check),
                      timing=dict(clock.seconds))
        (tmp / "lorax.json").write_text(json.dumps(record, indent=2) + "\n")
    return artifacts, controls


def file_digests(tmp: Path) -> dict[str, str]:
    """sha256 of every file published besides the GGUFs (listed with their artifacts) and lorax.json files. The
    merged dir's files as its own lorax.json records them: the merge's writer hashed the bytes on their way out
    (a second read of the 1.18B bench's 2.3 GB shard took ~3 s)."""
    meta = tmp / "merged" / "lorax.json"
    known = ({f"merged/{k}": v for k, v in (json.loads(meta.read_text()).get("files") or {}).items()}
             if meta.is_file() else {})
    out = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and p.suffix != ".gguf" and p.name != "lorax.json":
            rel = str(p.relative_to(tmp))
            out[rel] = known.get(rel) or sha256_file(p)
    return out


def gate(source: Path, out_dir: Path, artifacts: list[Path], opts: ExportOptions, clock: Stopwatch | None = None,
         controls: dict | None = None):
    """Gate the published artifacts; the LoRA GGUF is measured on the base-as-trained GGUF it ships with.
    `controls`: lossless files of the merged weights the build kept (format -> (path, type))."""
    from exporter.export.gguf_build import recipes_from_record
    from exporter.gate.check import GateOptions, check
    from exporter.gate.targets import open_target

    record = json.loads((out_dir / "lorax.json").read_text())
    kinds = {a["path"]: a["kind"] for a in record.get("artifacts", [])}
    lora = next((out_dir / p for p, k in kinds.items() if k == "lora"), None)
    targets = [open_target(p, lora if kinds.get(p.name) == "base" else None) for p in artifacts]
    merged = out_dir / "merged" if is_adapter(source) else source
    gopts = GateOptions(base=opts.base, trained_on=opts.trained_on, double_quant=opts.double_quant,
                        prompts=opts.prompts, report_dir=out_dir, gen_tokens=opts.gen_tokens,
                        max_samples=opts.max_samples, overrides=opts.overrides, floor=opts.floor, lora=lora,
                        merged_dir=merged, recipes=recipes_from_record(record, out_dir), clock=clock,
                        reuse_reference=opts.reuse_reference, controls=controls or {})
    report = check(source, targets, gopts)
    if (out_dir / "quant.md").is_file():  # --quant auto: every candidate measured, below the gate's verdict
        with open(out_dir / "report.md", "a") as fh:
            fh.write("\n" + (out_dir / "quant.md").read_text())
    meta = record
    meta["gate"] = {"status": "passed" if report.passed else "failed", "passed": report.passed,
                    "report": "report.md", "targets": {t.name: t.passed for t in report.targets}}
    write_json_atomic(out_dir / "lorax.json", meta)  # a kill here leaves "pending", which a rerun finishes
    write_card(out_dir)  # dist/README.md, generated from report.json
    return report
