"""lorax: QLoRA fine-tune -> merged weights -> GGUF / ONNX, gated by parity checks.

The `exporter` package owns the CLI, the merge, the parity gate and the export pipeline;
`train` owns training and `formats` one writer/runner per output format.
"""
