"""The parity/drift gate: the reference as trained, the targets, metrics, thresholds and the report.

    lorax check adapter/ dist/model-q8_0.gguf
"""
