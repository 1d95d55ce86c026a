"""QLoRA training: config, data, model loading, the Trainer run, and lorax.json.

`train` knows nothing of `exporter` or `formats`.
"""
