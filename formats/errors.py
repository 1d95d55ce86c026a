"""The error a format raises for bad input: one line that names the problem and the fix (exit 2)."""

from lorax_common.errors import UserError


class FormatError(UserError):
    """Bad or unsupported input to a format writer, reader or runner."""
