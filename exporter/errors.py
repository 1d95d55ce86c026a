"""Error types the CLI maps to exit codes.

`LoraxError` is bad input or an impossible request: the CLI prints its message as one line
(`error: ...`) and exits 2. `GateFailed` means an artifact drifted past a threshold: exit 1.
"""


class LoraxError(Exception):
    """A user-facing problem with one clear line of explanation (what is wrong and how to fix it)."""

    exit_code = 2


class GateFailed(LoraxError):
    """A parity or drift check failed; the report says which metric of which target."""

    exit_code = 1
