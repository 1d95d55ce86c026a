"""Quantize the float32 ONNX decoder's weights with onnxruntime.quantization into MatMulNBits.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int8    # 8-bit weight blocks (RTN)
    lorax export adapter/ --out dist/ --onnx --onnx-quant int4    # 4-bit weight blocks (HQQ), the
                                                                   # form laptop/phone runtimes use

Both write `MatMulNBits` (block-wise weights, 32 per block, one scale each) for every MatMul with a
constant weight, the lm_head included; attention, norms, the embedding Gather, the KV cache and the
graph's I/O stay float32. Measured on SmolLM2-135M (mean KLD vs transformers float32, top-1):
  - int8 dynamic quantization (`quantize_dynamic`, activations scaled per tensor per call): KLD
    1.19, top-1 47% (14.3 / 0% with per_channel=True) -- LLM activation outliers ruin one shared
    scale -- so int8 is weight-only 8-bit instead: KLD 0.0078, top-1 98.6%;
  - int4 round-to-nearest (symmetric or not, block 32..128, lm_head kept or not): KLD 0.56-0.64,
    top-1 62%; HQQ (onnxruntime's calibration-free optimizer of scales and zero points): 0.075, 78%.
Accuracy level 4 lets onnxruntime's CPU kernel multiply in int8: level 0 (float) ran 12-20x slower.
HQQ's zero points are floats, which keeps its MatMulNBits off that int8 kernel: decode 5.9 tok/s vs 38 for
float32 (2026-12, 2 cores). Integer zero points are fast (RTN or onnxruntime's k_quant, lm_head at 8 bits:
75-81 tok/s) but lose far more (KLD 0.47 vs HQQ's 0.061 on SmolLM2); int4 keeps HQQ, accuracy first.
On a QLoRA merge (weights on the NF4 grid) every 4-bit method measured 0.37-0.45: see exporter/floor.py.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4

# Protobuf cannot serialize a model past 2 GiB; larger ones keep their weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 2**24


def _external(path: Path) -> bool:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0) > _PROTOBUF_LIMIT


def _int8_config():
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                        bits=8)


def _int4_config():
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    return HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=4)


QUANTIZERS: dict[str, Callable[[], object]] = {"int8": _int8_config, "int4": _int4_config}

# What each method writes, recorded in the export's lorax.json.
DESCRIPTIONS: dict[str, dict] = {
    "int8": {"op": "MatMulNBits", "bits": 8, "block_size": BLOCK_SIZE, "algorithm": "RTN symmetric",
             "accuracy_level": ACCURACY_LEVEL},
    "int4": {"op": "MatMulNBits", "bits": 4, "block_size": BLOCK_SIZE, "algorithm": "HQQ",
             "accuracy_level": ACCURACY_LEVEL},
}


def _set_accuracy_level(model, level: int) -> None:
    """HQQ's config takes no accuracy level; it is a plain attribute of each MatMulNBits node."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])


def quantize(src: Path, dest: Path, method: str, external_data: bool | None = None) -> Path:
    """Quantize the float32 graph at `src` into `dest` with `method` (a key of QUANTIZERS); weights go
    to `dest`.data when the source is past protobuf's limit (`external_data=None`) or as asked."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    big = _external(src) if external_data is None else external_data
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".prep.") as work:
        # onnxruntime's recommended pre-pass: its constant folding turns a tied lm_head's
        # Transpose(embedding) into a weight initializer, so the largest MatMul gets quantized too.
        prepped = Path(work) / "model.onnx"
        quant_pre_process(src, prepped, skip_symbolic_shape=True, save_as_external_data=_external(src),
                          all_tensors_to_one_file=True, external_data_location="model.onnx.data")
        quantizer = MatMulNBitsQuantizer(str(prepped), algo_config=QUANTIZERS[method]())
        quantizer.process()
        _set_accuracy_level(quantizer.model.model, ACCURACY_LEVEL)
        quantizer.model.save_model_to_file(str(dest), use_external_data_format=big)
    return dest
