"""Quantize the float32 ONNX decoder with onnxruntime.quantization: int8 dynamic or int4 MatMulNBits.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int8    # MatMul weights int8, activations
                                                                   # quantized per call (dynamic)
    lorax export adapter/ --out dist/ --onnx --onnx-quant int4    # MatMulNBits: 4-bit weight blocks,
                                                                   # the form laptop/phone runtimes use

Only MatMuls with constant weights are quantized; attention (activation x activation), norms and
the embedding Gather stay float32, and so do the KV cache and the graph's I/O.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

# int4: 32-weight blocks (llama.cpp's Q4_0 block too) with a scale each, symmetric; accuracy level 4
# lets onnxruntime's CPU kernel multiply in int8 (its fast path; the gate measures what it costs).
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4

# Protobuf cannot serialize a model past 2 GiB; larger ones keep their weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 2**24


def _external(path: Path) -> bool:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0) > _PROTOBUF_LIMIT


def quantize_int8(src: Path, dest: Path, external_data: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src, dest, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True,
        use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True},
    )


def quantize_int4(src: Path, dest: Path, external_data: bool) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(src), block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dest), use_external_data_format=external_data)


QUANTIZERS: dict[str, Callable[[Path, Path, bool], None]] = {"int8": quantize_int8, "int4": quantize_int4}


def quantize(src: Path, dest: Path, method: str, external_data: bool | None = None) -> Path:
    """Quantize the float32 graph at `src` into `dest` with `method` (a key of QUANTIZERS); weights go
    to `dest`.data when the source is past protobuf's limit (`external_data=None`) or as asked."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    big = _external(src) if external_data is None else external_data
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".prep.") as work:
        # onnxruntime's recommended pre-pass: its constant folding turns a tied lm_head's
        # Transpose(embedding) into a weight initializer, so the largest MatMul gets quantized too.
        prepped = Path(work) / "model.onnx"
        quant_pre_process(src, prepped, skip_symbolic_shape=True, save_as_external_data=big,
                          all_tensors_to_one_file=True, external_data_location="model.onnx.data" if big else None)
        QUANTIZERS[method](prepped, dest, big)
    return dest
