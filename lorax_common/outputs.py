"""Outputs that never destroy inputs, never half-exist, and belong to one run at a time.

    lorax merge adapter/ --out merged/            # merged/ is complete or absent, never half-written
    lorax export ad/ --out ad/ --gguf --force     # refused (exit 2): --out is the adapter itself

    with output_lock(out) as lock:                # held for the whole run; a second run fails at once
        with atomic_dir(out, force, lock=lock) as tmp:
            ...                                   # build in .out.XXXXXXXX.tmp/, renamed to out/ at the end

The lock is `fcntl.flock` on a sibling `.NAME.lock` (the kernel drops it when a process dies, even by
kill -9, so a dead run never blocks the next one). Taking it also sweeps what killed runs left for this
output: `.NAME.XXXXXXXX.tmp` staging and `.NAME.old-PID` beside it, hidden `.*.tmp`/`.*.part` inside
it (`.gguf-XXXXXXXX.tmp`, half-replaced reports). Only
the lock holder sweeps, so a live run's staging is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorax_common.errors import UserError

log = logging.getLogger(__name__)

# errno -> what the user should do about it, for OSErrors raised while an output is written
WRITE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free disk space or choose an --out on another disk",
    errno.EDQUOT: "free disk space (quota exceeded) or choose another --out",
    errno.EACCES: "fix the permissions or choose another --out",
    errno.EPERM: "fix the permissions or choose another --out",
    errno.EROFS: "the filesystem is read-only; choose another --out",
}


def _staging_patterns(name: str) -> tuple[re.Pattern[str], ...]:
    # mkdtemp/mkstemp add exactly 8 characters: `.dist.v2.abcdefgh.tmp` is dist.v2's, never dist's
    n = re.escape(name)
    return re.compile(rf"^\.{n}\.[a-z0-9_]{{8}}\.tmp$"), re.compile(rf"^\.{n}\.old-\d+$")


# staging inside a published out dir (formats.gguf.export's `.gguf-*.tmp`, report and lorax.json
# replacements): hidden and ending .tmp/.part, so no finished file of a run is ever matched
INSIDE_STAGING = (re.compile(r"^\..+\.(tmp|part)$"),)


def umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_staging(dest: Path) -> tuple[int, int]:
    """Remove what killed runs left for `dest` (caller holds its lock); returns (entries, bytes)."""
    found: list[Path] = []
    patterns = _staging_patterns(dest.name)
    if dest.parent.is_dir():
        found += [p for p in dest.parent.iterdir() if any(r.match(p.name) for r in patterns)]
    if dest.is_dir() and not dest.is_symlink():
        found += [p for p in dest.iterdir() if any(r.match(p.name) for r in INSIDE_STAGING)]
    size = sum(_size(p) for p in found)
    for p in found:
        _remove(p)
    if found:
        log.warning("removed %d staging entr%s of %s left by an interrupted run (%.1f MB)", len(found),
                    "y" if len(found) == 1 else "ies", dest, size / 1e6)
    return len(found), size


class OutputLock:
    """An exclusive, non-blocking lock on one output path (see the module docstring)."""

    def __init__(self, dest: Path, fd: int, path: Path) -> None:
        self.dest, self.fd, self.path = dest, fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        # unlink while still holding it: a run that opened the old file re-checks the inode and retries
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = -1


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lock")


def acquire(dest: str | Path) -> OutputLock:
    """Lock `dest` for this run or fail at once (UserError) when another live run holds it."""
    dest = Path(dest)
    guard_write(dest.parent.mkdir, dest, parents=True, exist_ok=True)
    path = lock_path(dest)
    while True:
        fd = guard_write(os.open, dest, path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{dest} is being written by another lorax run (lock {path}); wait for it to "
                            "finish or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and unlinked it between our open and flock: take the new file
    lock = OutputLock(dest, fd, path)
    sweep_staging(dest)
    return lock


@contextlib.contextmanager
def output_lock(dest: str | Path) -> Iterator[OutputLock]:
    lock = acquire(dest)
    try:
        yield lock
    finally:
        lock.release()


def guard_write(fn, dest: Path, *args, **kwargs):
    """Call fn; an OSError of the kind users fix (disk full, permissions) becomes one line naming `dest`."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(e, dest) from None


def write_error(e: OSError, dest: Path) -> UserError:
    where = e.filename or dest
    return UserError(f"cannot write {dest}: {e.strerror} ({where}); {WRITE_ERRNOS[e.errno]}")


def _resolved(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def refuse_overlap(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside an input (symlinks followed), --force or not."""
    o = _resolved(out)
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        i = _resolved(inp)
        if o == i:
            raise UserError(f"{flag} {out} is the input {inp}; writing it would destroy the input; "
                            f"choose another {flag}")
        if o in i.parents:
            raise UserError(f"{flag} {out} contains the input {inp}; replacing it would delete the input; "
                            f"choose another {flag}")
        if i in o.parents:
            raise UserError(f"{flag} {out} lies inside the input {inp}; choose an {flag} outside it")


def _publish(tmp: Path, dest: Path, force: bool) -> None:
    """Rename tmp to dest. Something at dest is replaced only with force (the caller holds the lock)."""
    if not os.path.lexists(dest):
        tmp.rename(dest)  # onto a path that appeared since the check: a dir rename fails (ENOTEMPTY), never merges
        return
    if not force:
        raise UserError(f"{dest} appeared while this run was building it (written by something other than "
                        "lorax); nothing was replaced; move it away or pass --force, then run again")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    dest.rename(old)  # aside first, so a failed rename loses nothing
    tmp.rename(dest)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, force: bool = False, lock: OutputLock | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success it becomes `dest`, on error it is removed.

    Without `lock`, the output is locked for the duration of the block."""
    dest = Path(dest)
    refuse_existing(dest, force)
    with contextlib.ExitStack() as stack:
        if lock is None:
            lock = stack.enter_context(output_lock(dest))
        tmp = Path(guard_write(tempfile.mkdtemp, dest, prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the result should look like a normal mkdir
        try:
            yield tmp
            guard_write(_publish, dest, tmp, dest, force)
        except OSError as e:
            _remove(tmp)
            if e.errno in WRITE_ERRNOS:
                raise write_error(e, dest) from None
            raise
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def scratch_dir(dest: str | Path) -> Iterator[Path]:
    """A temp dir beside `dest` for files a run needs only while it runs (same filesystem: files move in by
    rename), removed when the block ends. Named like `dest`'s staging, so a killed run's is swept by the
    next lock holder like the rest (sweep_staging)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(guard_write(tempfile.mkdtemp, dest, prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_file(dest: str | Path, force: bool = False, lock: OutputLock | None = None) -> Iterator[Path]:
    """Yield a temp file path beside `dest`; renamed to `dest` only when the block succeeds.

    The file gets the mode a plain open() would give it (mkstemp makes 0600)."""
    dest = Path(dest)
    refuse_existing(dest, force)
    with contextlib.ExitStack() as stack:
        if lock is None:
            lock = stack.enter_context(output_lock(dest))
        fd, name = guard_write(tempfile.mkstemp, dest, prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            if os.path.lexists(dest) and not force:
                raise UserError(f"{dest} appeared while this run was writing it (not by lorax); nothing was "
                                "replaced; move it away or pass --force")
            guard_write(os.replace, dest, tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in WRITE_ERRNOS:
                raise write_error(e, dest) from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def refuse_existing(dest: Path, force: bool) -> None:
    if os.path.lexists(dest) and not force:
        raise UserError(f"{dest} already exists; choose another --out or pass --force to replace it")


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Fail before hours of work when a directory lorax will write into (or create) cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory; choose a directory")
    probe_dir = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as e:
        hint = WRITE_ERRNOS.get(e.errno, "choose another directory").replace("--out", flag)
        raise UserError(f"{flag} {path} is not writable ({e.strerror} in {probe_dir}); {hint}") from None
