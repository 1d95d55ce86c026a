"""Atomic output: build in a temp path next to the destination, rename when complete.

Nothing half-written is ever left at the destination, and an existing destination is only
replaced with `force=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from formats.errors import FormatError


def refuse_existing(dest: Path, force: bool) -> None:
    if dest.exists() and not force:
        raise FormatError(f"{dest} already exists; choose another --out or pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success it becomes `dest`, on error it is removed."""
    dest = Path(dest)
    refuse_existing(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like a normal mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        # Only reached with force=True: move the old one aside first so a failed rename loses nothing.
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(dest)


@contextlib.contextmanager
def atomic_file(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp file path beside `dest`; renamed over `dest` only when the block succeeds."""
    dest = Path(dest)
    refuse_existing(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
