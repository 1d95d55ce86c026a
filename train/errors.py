"""The error training raises for bad config or data: one line naming the file, line or key, and the fix (exit 2)."""

from lorax_common.errors import UserError


class TrainError(UserError):
    """Bad training input (config key, data file, base model)."""
