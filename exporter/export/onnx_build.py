"""The ONNX stage of `lorax export`: the graphs, and the importance matrix int4 is weighted by.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int4      # dist/onnx/ (+ dist/imatrix.gguf)

The matrix is the export's one importance matrix (exporter.export.gguf_build computes it when a GGUF K-quant
needs it; otherwise it is computed here from the same training rows), shipped as dist/imatrix.gguf and named
in lorax.json's `onnx_recipes`, so the floor and a resumed gate weigh their int4 files the same way.
"""

from __future__ import annotations

from pathlib import Path

from exporter.export.gguf_build import IMATRIX_FILE, importance_matrix, recipe_record
from formats.gguf.imatrix import Imatrix, write_imatrix
from formats.gguf.quantize import Recipe


def onnx_recipe(source: Path, merged: Path, tmp: Path, imx: Imatrix | None, opts, clock) -> Recipe | None:
    """The ONNX quantization's recipe: the export's importance matrix (computed here when no GGUF needed one),
    written to dist/imatrix.gguf so the floor and a resumed gate read back the same weighting."""
    from formats.onnx.quantize import wants_importance

    if not wants_importance(opts.onnx_quant):
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
    importance = hf_importance(recipe.imatrix, merged) if recipe is not None else None
    with clock("onnx"):
        export_onnx(merged, tmp / "onnx", dtype=opts.onnx_dtype, quant=opts.onnx_quant, importance=importance)
    return {"onnx_recipes": {opts.onnx_quant: recipe_record(recipe)}} if opts.onnx_quant else {}
