"""Atomic output: build in a temp path next to the destination, rename when complete.

Nothing half-written is ever left at the destination, an existing destination is only replaced with
`force=True`, and the output is locked for the run (lorax_common.outputs has the mechanics; this
module adds the formats' own error type for the existence check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from formats.errors import FormatError
from lorax_common import outputs
from lorax_common.outputs import OutputLock


def refuse_existing(dest: Path, force: bool) -> None:
    if Path(dest).exists() and not force:
        raise FormatError(f"{dest} already exists; choose another --out or pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(dest: str | Path, force: bool = False, lock: OutputLock | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success it becomes `dest`, on error it is removed."""
    refuse_existing(Path(dest), force)
    with outputs.atomic_dir(dest, force, lock) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(dest: str | Path, force: bool = False, lock: OutputLock | None = None) -> Iterator[Path]:
    """Yield a temp file path beside `dest`; renamed over `dest` only when the block succeeds."""
    refuse_existing(Path(dest), force)
    with outputs.atomic_file(dest, force, lock) as tmp:
        yield tmp
