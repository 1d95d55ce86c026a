"""The error training raises for bad config or data: one line naming the file, line or key, and the fix."""


class TrainError(Exception):
    """Bad training input (config key, data file, base model)."""
