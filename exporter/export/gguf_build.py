"""The GGUF half of `lorax export`: importance matrix, per-type recipes, `--quant auto`, then the writer.

    lorax export adapter/ --out dist --gguf --quant q4_k_m                        # imatrix auto (the default)
    lorax export adapter/ --out dist --gguf --quant q4_k_m --imatrix off          # plain libllama
    lorax export adapter/ --out dist --gguf --quant q4_k_m --imatrix my.imatrix.gguf
    lorax export adapter/ --out dist --gguf --quant auto --max-kld 0.1
    lorax export adapter/ --out dist --gguf --quant q4_k_m --tensor-type 'ffn_down=q8_0' --embedding-type q8_0

dist/imatrix.gguf is the matrix every shipped file was quantized with (llama.cpp's format: `llama-quantize
--imatrix dist/imatrix.gguf` accepts it); lorax.json records per artifact the recipe, and the gate
rebuilds that recipe from the record for the floor (`recipes_from_record`), so a resumed or separate
`lorax check` builds its floor exactly as the export built the target.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from exporter.errors import LoraxError
from exporter.export.calibration import CALIBRATION_FILE, read_calibration
from exporter.gate.registry import recipe_key
from formats.gguf.imatrix import Imatrix, collect_imatrix, read_imatrix, token_budget, write_imatrix
from formats.gguf.quantize import LIBLLAMA_TYPES, NEEDS_IMATRIX, Recipe

log = logging.getLogger(__name__)

IMATRIX_FILE = "imatrix.gguf"


@dataclass
class GGUFBuild:
    result: object  # formats.gguf.export.GGUFExport
    recipes: dict[str, Recipe]
    record: dict = field(default_factory=dict)  # lorax.json additions
    report_md: str | None = None  # the --quant auto table, appended to report.md after the gate
    imatrix: Imatrix | None = None  # the matrix computed or read (the ONNX int4 quantizer reuses it)


def user_recipe(opts) -> Recipe:
    pairs = []
    for spec in opts.tensor_types:
        pattern, sep, qtype = spec.rpartition("=")
        if not sep or not pattern:
            raise LoraxError(f"--tensor-type {spec!r}: expected PATTERN=TYPE, e.g. ffn_down=q8_0")
        pairs.append((pattern, qtype.strip().lower()))
    return Recipe(tensor_types=tuple(pairs), output_type=opts.output_type, embedding_type=opts.embedding_type)


def importance_matrix(source: Path, merged: Path, opts, needed: bool) -> Imatrix | None:
    """The matrix: read from --imatrix FILE, computed from the training rows (auto), or None."""
    if opts.imatrix == "off" or not needed:
        return None
    if opts.imatrix != "auto":
        return read_imatrix(opts.imatrix)
    from transformers import AutoTokenizer

    from exporter.export.calibration import calibration_sequences
    from lorax_common.memory import release

    try:
        cal = calibration_sequences(source, AutoTokenizer.from_pretrained(merged), opts.calibration)
    except LoraxError as e:
        log.warning("%s; quantizing without an importance matrix", e)
        return None
    budget = token_budget(merged, opts.imatrix_tokens)
    if opts.imatrix_tokens is None:
        log.info("importance matrix: up to %d calibration tokens (--imatrix-tokens auto, by model size)", budget)
    try:
        return collect_imatrix(merged, cal.sequences, token_budget=budget, datasets=[cal.source])
    finally:
        release()  # the model it ran is gone: hand its heap back before the quantizer and the gate


def recipes_for(quants: tuple[str, ...], imx: Imatrix | None, opts) -> dict[str, Recipe]:
    from exporter.export.quant_recipes import default_recipe

    user = user_recipe(opts)
    out = {}
    for q in quants:
        if q not in LIBLLAMA_TYPES:
            continue
        base = Recipe(imatrix=imx) if (imx is not None and opts.imatrix != "auto") else default_recipe(q, imx)
        out[q] = replace(base, tensor_types=user.tensor_types + base.tensor_types,
                         output_type=user.output_type or base.output_type,
                         embedding_type=user.embedding_type or base.embedding_type)
        if q in NEEDS_IMATRIX and out[q].imatrix is None:
            raise LoraxError(f"--quant {q} needs an importance matrix and none could be made; pass --calibration "
                             "FILE or --imatrix FILE")
    return out


def recipe_record(recipe: Recipe | None) -> dict | None:
    if recipe is None or recipe.plain:
        return None
    out = {"imatrix": IMATRIX_FILE if recipe.imatrix is not None else None,
           "imatrix_tokens": recipe.imatrix.tokens if recipe.imatrix is not None else None,
           "tensor_types": [f"{p}={t}" for p, t in recipe.tensor_types],
           "output_type": recipe.output_type, "embedding_type": recipe.embedding_type}
    if recipe.calibration:  # ONNX int4's GPTQ rows (exporter.export.onnx_build)
        out["calibration"] = CALIBRATION_FILE
        out["calibration_tokens"] = sum(map(len, recipe.calibration))
    return out


def recipes_from_record(record: dict, out_dir: Path) -> dict[str, Recipe]:
    """type -> Recipe of every GGUF artifact in a lorax.json (the floor builds with these)."""
    out: dict[str, Recipe] = {}
    imx = None
    for a in record.get("artifacts", []):
        r = a.get("recipe")
        if a.get("format") != "gguf" or not r:
            continue
        if r.get("imatrix") and imx is None:
            imx = read_imatrix(out_dir / r["imatrix"])
        out[a["type"]] = Recipe(imatrix=imx if r.get("imatrix") else None,
                                tensor_types=tuple(tuple(s.rsplit("=", 1)) for s in r.get("tensor_types", [])),
                                output_type=r.get("output_type"), embedding_type=r.get("embedding_type"))
    for qtype, r in (record.get("onnx_recipes") or {}).items():  # the ONNX int4 quantizer's rows or weighting
        if r and r.get("calibration"):
            out[recipe_key("onnx", qtype)] = Recipe(calibration=read_calibration(out_dir / r["calibration"]))
        elif r and r.get("imatrix"):
            imx = imx or read_imatrix(out_dir / r["imatrix"])
            out[recipe_key("onnx", qtype)] = Recipe(imatrix=imx)
    return out


def export_dir_of(artifact: Path) -> Path:
    """The `lorax export` dir an artifact sits in: a GGUF's folder; DIST for DIST/onnx; else the path itself."""
    artifact = Path(artifact)
    if artifact.is_file():
        return artifact.parent
    meta = artifact / "lorax.json"
    if meta.is_file() and json.loads(meta.read_text()).get("kind") == "onnx":
        return artifact.parent
    return artifact


def recipes_of_artifacts(artifacts: list[Path]) -> dict[str, Recipe]:
    """The recipes the exports holding `artifacts` quantized with (lorax.json beside them), for a standalone
    `lorax check`: its floor then builds each type as the target was built, as `lorax export`'s gate does.
    Two exports that quantized one type differently cannot share one floor: refused."""
    out: dict[str, Recipe] = {}
    for dist in dict.fromkeys(export_dir_of(a) for a in artifacts):
        meta = dist / "lorax.json"
        record = json.loads(meta.read_text()) if meta.is_file() else {}
        if record.get("kind") not in (None, "export"):
            continue
        for key, recipe in recipes_from_record(record, dist).items():
            if key in out and out[key].identity() != recipe.identity():
                raise LoraxError(f"{key} was quantized differently in two of the checked exports; "
                                 f"check one export's artifacts at a time")
            out[key] = recipe
    return out


def merged_of_artifacts(adapter: Path, artifacts: list[Path]) -> Path | None:
    """The merged weights the checked artifacts were written from, when one `lorax export` dir holds them all
    and its merged/ was merged from this very adapter (merged/lorax.json's adapter sha256): a standalone
    `lorax check` then builds its lossless control from them instead of merging again. A merged dir from
    other weights could only make that control fail, never pass a writer bug."""
    from lorax_common.hashing import sha256_file

    dists = {export_dir_of(a) for a in artifacts}
    if len(dists) != 1:
        return None
    merged = next(iter(dists)) / "merged"
    meta, weights = merged / "lorax.json", Path(adapter) / "adapter_model.safetensors"
    if not (meta.is_file() and weights.is_file() and (merged / "config.json").is_file()):
        return None
    try:
        recorded = json.loads(meta.read_text()).get("adapter", {}).get("weights_sha256")
    except (ValueError, AttributeError):
        return None
    return merged if recorded and recorded == sha256_file(weights) else None


def build_gguf(source: Path, merged: Path, tmp: Path, opts, clock, keep_source: Path | None = None) -> GGUFBuild:
    """Every GGUF of the export into `tmp` (the staging dist); stage times into `clock` (a Stopwatch).
    `keep_source`: where libllama's source file goes instead of being deleted (the gate's control)."""
    from exporter.export.quant_recipes import wants_imatrix
    from formats.gguf.export import GGUFOptions, export_gguf

    auto = "auto" in opts.quants
    quants = tuple(q for q in opts.quants if q != "auto")
    needed = auto or opts.imatrix != "auto" or wants_imatrix(quants)
    with clock("imatrix"):
        imx = importance_matrix(source, merged, opts, needed)
    record: dict = {}
    report_md = None
    if auto:
        with clock("quant auto"):
            chosen, report_md, rows = choose_auto(source, merged, tmp, imx, opts)
        quants = tuple(dict.fromkeys([*quants, chosen.candidate.qtype]))
        recipes = recipes_for(quants, imx, opts)
        recipes[chosen.candidate.qtype] = chosen.candidate.recipe
        record["quant_auto"] = {"chosen": chosen.candidate.name, "max_kld": opts.max_kld,
                                "max_size": opts.max_size, "candidates": rows}
    else:
        recipes = recipes_for(quants, imx, opts)
    if any(r.imatrix is not None for r in recipes.values()):
        write_imatrix(imx, tmp / IMATRIX_FILE)
    with clock("gguf " + " ".join(quants)):
        result = export_gguf(merged, tmp, quants, GGUFOptions(adapter_dir=source if opts.gguf_adapter else None,
                                                              recipes=recipes, keep_source=keep_source))
    return GGUFBuild(result, recipes, record, report_md, imx)


def choose_auto(source: Path, merged: Path, tmp: Path, imx: Imatrix | None, opts):
    """Measure the candidate pool on the gate's samples; (winner, markdown table, rows); quant.svg into tmp."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from exporter.export import quant_auto
    from exporter.export.quant_recipes import auto_pool
    from exporter.gate.evaluate import Yardstick, run_reference
    from exporter.gate.samples import build, load_rows
    from formats.gguf.export import GGUFOptions, export_gguf
    from formats.gguf.writer import source_type
    from formats.hf.runner import HFRunner

    tok = AutoTokenizer.from_pretrained(merged)
    rows, where = load_rows(opts.prompts, source)
    samples = build(rows, tok, max_samples=opts.max_samples)
    work = Path(tempfile.mkdtemp(prefix=".quant-auto-", dir=tmp))
    try:
        ref = HFRunner(merged, name="merged")
        try:
            yard = Yardstick(samples, tok, opts.gen_tokens)
            ref_out = run_reference(ref, yard)
        finally:
            ref.close()
        inter = export_gguf(merged, work, [source_type(merged)], GGUFOptions(stem="inter", check_tokenizer=False,
                            progress=False)).files[0].path
        measured = quant_auto.measure(auto_pool(imx, user_recipe(opts)), inter, work, yard, ref_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    chosen = quant_auto.choose(measured, opts.max_kld, opts.max_size)
    budget = " and ".join(b for b in (f"mean KLD ≤ {opts.max_kld}" if opts.max_kld is not None else "",
                                      f"≤ {opts.max_size:,} bytes" if opts.max_size is not None else "") if b)
    (tmp / "quant.svg").write_text(quant_auto.size_kld_svg(measured, chosen))
    md = quant_auto.to_markdown(measured, chosen, f"{budget} ({where}, {len(samples)} samples)")
    (tmp / "quant.md").write_text(md)
    return chosen, md, [m.row() for m in measured]
