"""Where lorax keeps what it reuses between runs: $LORAX_CACHE, default ~/.cache/lorax.

    LORAX_CACHE=/big/disk lorax export ...    # crash logs, the imported default model, npm clients
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LORAX_CACHE", Path.home() / ".cache" / "lorax"))
