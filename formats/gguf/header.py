"""A few metadata values from a GGUF header, read without parsing the whole file.

    read_values("dist/model-q4_k_m.gguf", {"general.file_type"})   # {"general.file_type": 15}

The gate only needs `general.file_type` to pick a target's thresholds; gguf-py's GGUFReader builds a
numpy view of every field and tensor first (4.8 s for SmolLM2's 49k-token vocabulary, per target). This
walks the key/value section with struct, skipping values it was not asked for, and stops as soon as every
wanted key was seen. Layout facts (gguf-py's constants): "GGUF", uint32 version, uint64 tensor count,
uint64 kv count, then per kv a string key (uint64 length + UTF-8), a uint32 value type and the value;
arrays are a uint32 item type, a uint64 count and the items. Little-endian files only (what lorax and
llama.cpp's converter write); others raise FormatError like a damaged file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from formats.errors import FormatError

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
# value type -> struct format of a scalar (gguf-py GGUFValueType)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(fh: BinaryIO, n: int, path: Path) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise FormatError(f"{path}: GGUF header is truncated; re-export or re-download the file")
    return data


def _unpack(fh: BinaryIO, fmt: str, path: Path) -> Any:
    return struct.unpack(fmt, _read(fh, struct.calcsize(fmt), path))[0]


def _string(fh: BinaryIO, path: Path, keep: bool) -> str | None:
    n = _unpack(fh, "<Q", path)
    if n > 1 << 30:
        raise FormatError(f"{path}: GGUF header holds a {n}-byte string; the file is damaged")
    if not keep:
        fh.seek(n, 1)
        return None
    return _read(fh, n, path).decode("utf-8", errors="replace")


def _value(fh: BinaryIO, vtype: int, path: Path, keep: bool) -> Any:
    if vtype == STRING:
        return _string(fh, path, keep)
    if vtype == ARRAY:
        itype, count = _unpack(fh, "<I", path), _unpack(fh, "<Q", path)
        if itype in SCALARS and not keep:
            fh.seek(struct.calcsize(SCALARS[itype]) * count, 1)
            return None
        return [_value(fh, itype, path, keep) for _ in range(count)]
    if vtype not in SCALARS:
        raise FormatError(f"{path}: GGUF header has an unknown value type {vtype}; the file is damaged "
                          "or from a newer GGUF version")
    return _unpack(fh, SCALARS[vtype], path)


def _counts(fh: BinaryIO, path: Path) -> tuple[int, int]:
    """(tensor count, kv count) after checking magic and version."""
    if _read(fh, 4, path) != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (bad magic); pass a .gguf written by lorax or llama.cpp")
    version = _unpack(fh, "<I", path)
    if not 1 <= version <= 3:
        raise FormatError(f"{path}: GGUF version {version} is not one lorax reads (1-3, little-endian)")
    return _unpack(fh, "<Q", path), _unpack(fh, "<Q", path)


def _kv(fh: BinaryIO, path: Path, n_kv: int, keys: set[str], stop_when_found: bool) -> dict[str, Any]:
    """The values of `keys` among the next `n_kv` header entries; every entry is walked (the tensor index comes
    after them) unless `stop_when_found`."""
    found: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _string(fh, path, keep=True)
        value = _value(fh, _unpack(fh, "<I", path), path, keep=key in keys)
        if key in keys:
            found[key] = value
            if stop_when_found and len(found) == len(keys):
                break
    return found


def read_values(path: str | Path, keys: set[str]) -> dict[str, Any]:
    """The values of `keys` found in the header (absent keys are absent from the result)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _kv(fh, path, _counts(fh, path)[1], keys, stop_when_found=True)
    except OSError as e:
        raise FormatError(f"{path}: cannot read the GGUF file ({e.strerror or e})") from None


def tensor_names(path: str | Path) -> list[str]:
    """Names of the tensors in the file, from the tensor index after the kv section (read_header)."""
    return [name for name, _, _, _ in read_header(path, set())[1]]


ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32  # gguf-py's GGUF_DEFAULT_ALIGNMENT


def read_header(path: str | Path, keys: set[str]) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]],
                                                         int]:
    """The whole header in one pass: the values of `keys`, the tensor index (name, dims, ggml type, offset in the
    data section) and the byte where the data section starts (aligned to general.alignment)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            n_tensors, n_kv = _counts(fh, path)
            found = _kv(fh, path, n_kv, set(keys) | {ALIGNMENT_KEY}, stop_when_found=False)
            tensors = []
            for _ in range(n_tensors):
                name = _string(fh, path, keep=True)
                n_dims = _unpack(fh, "<I", path)
                if n_dims > 8:
                    raise FormatError(f"{path}: GGUF tensor {name!r} has {n_dims} dimensions; the file is damaged")
                dims = tuple(_unpack(fh, "<Q", path) for _ in range(n_dims))
                tensors.append((name, dims, _unpack(fh, "<I", path), _unpack(fh, "<Q", path)))
            align = int(found.pop(ALIGNMENT_KEY, DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
            start = -(-fh.tell() // align) * align
    except OSError as e:
        raise FormatError(f"{path}: cannot read the GGUF file ({e.strerror or e})") from None
    return {k: v for k, v in found.items() if k in keys}, tensors, start
