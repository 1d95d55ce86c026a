"""Output formats: one module or package per format, each with a writer and a runner for the gate.

`formats` knows nothing of `exporter` or `train`.
"""
