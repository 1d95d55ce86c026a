"""`lorax export`'s engine: the pipeline (merge -> writers -> gate), the GGUF build with its recipes and
`--quant auto`, the calibration text, dist/'s published state and the model card.

    lorax export adapter/ --out dist/ --gguf --quant q4_k_m --onnx
"""
