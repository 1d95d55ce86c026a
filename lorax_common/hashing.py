"""sha256 of files and of sets of files: what lorax.json records so a later step can prove its inputs.

    cd base/ && sha256sum *.safetensors | sha256sum     # = lorax.json base.weights_sha256

`weights_digest` is sha256 over `sha256sum`-style lines ("<hash>  <name>\\n") sorted by name, so a user
can check it with coreutils (the shell's glob is sorted by name, as the lines are here).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

CHUNK = 1 << 22


def sha256_file(path: str | Path, stop: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks; stops early (partial digest) once `stop` is set."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while (block := f.read(CHUNK)) and not (stop and stop.is_set()):
            h.update(block)
    return h.hexdigest()


def weights_digest(file_hashes: dict[str, str]) -> str:
    """sha256 over "<hash>  <name>\\n" lines sorted by name (pure; the same as `sha256sum * | sha256sum`)."""
    lines = "".join(f"{file_hashes[name]}  {name}\n" for name in sorted(file_hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_tree(path: Path) -> str:
    """A file's sha256, or for a directory the digest of all its files (names relative to it)."""
    if path.is_file():
        return sha256_file(path)
    files = {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return weights_digest(files)
