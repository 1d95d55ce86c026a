"""What every lorax package shares and no package owns: the error root and exit codes, safe outputs,
validated readers. It imports nothing of `exporter`, `formats` or `train` (they all import it), and
nothing heavy, so `lorax --help` stays instant.
"""
