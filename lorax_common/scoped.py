"""Process-wide settings changed only inside a `with` block and restored on exit, never behind a caller's back.

    with torch_threads(1):                      # e.g. one op per worker thread
        ...
    with logger_level("torch.onnx", logging.ERROR):
        ...

torch's intra-op thread count and a library logger's level belong to the whole process; a library that
needs another value for one step sets it here, and the caller finds what it had set when the step returns
(also when it raises).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch ops use n intra-op threads inside; yields the count that was set before (restored on exit)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """The named logger at `level` inside; its own level (often NOTSET) comes back on exit."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
