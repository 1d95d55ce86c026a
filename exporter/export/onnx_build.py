"""The ONNX stage of `lorax export`: the graphs, and what the int4 quantizer calibrates on.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int4      # dist/onnx/ + dist/calibration.json

int4 runs GPTQ (formats/onnx/gptq.py) on the fine-tune's own training rows (exporter.export.calibration, the
rows the importance matrix reads). Their token ids ship as dist/calibration.json and lorax.json's
`onnx_recipes` names the file, so the floor and a later `lorax check` quantize their int4 files from the same
rows. Without training rows (an HF dir exported alone, data that moved) int4 falls back to the weighted
search (formats.onnx.quantize.UNCALIBRATED), weighted by the export's importance matrix (dist/imatrix.gguf)
when there is one; lorax.json's `quantization` says which ran.
"""

from __future__ import annotations

from pathlib import Path

from exporter.export.calibration import CALIBRATION_FILE, calibration_rows, write_calibration
from exporter.export.gguf_build import IMATRIX_FILE, importance_matrix, recipe_record
from formats.gguf.imatrix import Imatrix, write_imatrix
from formats.gguf.quantize import Recipe


def onnx_recipe(source: Path, merged: Path, tmp: Path, imx: Imatrix | None, opts, clock) -> Recipe | None:
    """The ONNX quantization's recipe: GPTQ's calibration rows (written to dist/calibration.json), or for the
    uncalibrated fallback the export's importance matrix (dist/imatrix.gguf), so the floor and a resumed gate
    quantize their files the same way."""
    from formats.onnx.quantize import wants_calibration, wants_importance

    rows: tuple[tuple[int, ...], ...] = ()
    if wants_calibration(opts.onnx_quant):
        with clock("calibration"):
            rows = calibration_rows(source, merged, opts)
        if rows:
            write_calibration(rows, tmp / CALIBRATION_FILE)
            return Recipe(calibration=rows)
    if not wants_importance(opts.onnx_quant, calibrated=bool(rows)):
        return None
    if imx is None:
        with clock("imatrix"):
            imx = importance_matrix(source, merged, opts, needed=True)
    if imx is None:
        return None
    if not (tmp / IMATRIX_FILE).is_file():
        write_imatrix(imx, tmp / IMATRIX_FILE)
    return Recipe(imatrix=imx)


def build_onnx(source: Path, merged: Path, tmp: Path, imx: Imatrix | None, opts, clock) -> dict:
    """Write tmp/onnx from the merged dir; returns lorax.json's additions (the quantization's recipe)."""
    from formats.gguf.imatrix import hf_importance
    from formats.onnx.export import export_onnx

    recipe = onnx_recipe(source, merged, tmp, imx, opts, clock)
    importance = hf_importance(recipe.imatrix, merged) if recipe is not None and recipe.imatrix else None
    calibration = recipe.calibration if recipe is not None else None
    with clock("onnx"):
        export_onnx(merged, tmp / "onnx", dtype=opts.onnx_dtype, quant=opts.onnx_quant, importance=importance,
                    calibration=calibration)
    return {"onnx_recipes": {opts.onnx_quant: recipe_record(recipe)}} if opts.onnx_quant else {}
