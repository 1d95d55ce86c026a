"""`python -m exporter.cli.main ...` is `lorax ...` (torchrun launches training this way)."""

from exporter.cli.main import run

run()
