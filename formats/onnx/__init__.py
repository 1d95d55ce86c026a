"""ONNX output: a KV-cache decoder for onnxruntime in optimum's layout, quantized on request.

    lorax export adapter/ --out dist/ --onnx [--onnx-dtype float16 | --onnx-quant int8|int4]

layout.py (supported archs, I/O names) -> decoder.py (torch.onnx trace) -> quantize.py
(onnxruntime.quantization) -> export.py (the entry point, files next to the model) ; runner.py runs
the result for the parity gate and the demo. Nothing here imports torch or onnxruntime at import time
except decoder.py, which only export.py imports, inside its function.
"""
