"""Error types the CLI maps to exit codes (the contract is in lorax_common.errors).

`LoraxError` is bad input or an impossible request: the CLI prints its message as one line
(`error: ...`) and exits 2. `GateFailed` means an artifact drifted past a threshold: exit 1.
"""

from lorax_common.errors import GateFailed, UserError

__all__ = ["GateFailed", "LoraxError"]


class LoraxError(UserError):
    """A user-facing problem with one clear line of explanation (what is wrong and how to fix it)."""
