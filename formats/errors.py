"""The error a format raises for bad input: one line that names the problem and the fix."""


class FormatError(Exception):
    """Bad or unsupported input to a format writer, reader or runner."""
