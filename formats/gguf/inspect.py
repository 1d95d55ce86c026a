"""Validate a GGUF file before anything heavy reads it, and describe what it holds.

Bad files must fail with one line that names the problem, not a numpy traceback from deep
inside a memory map: check the magic, walk the header (formats.gguf.header), check every tensor's data
lies inside the file (truncation), and check the architecture is one lorax carries end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from formats.archs import SUPPORTED
from formats.errors import FormatError

GGUF_MAGIC = b"GGUF"

# llama.cpp architectures of the GGUFs lorax writes and gates (formats/archs.py is the one list).
SUPPORTED_ARCHS: tuple[str, ...] = tuple(dict.fromkeys(a.gguf_arch for a in SUPPORTED.values()))
# ... and those `lorax import-gguf` turns back into HF dirs (transformers' GGUF reader, checked per arch)
IMPORTABLE_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    arch: str
    name: str | None
    n_tensors: int
    file_type: int | None
    tensor_types: dict[str, int]
    pre_tokenizer: str | None = None


HEADER_KEYS = {"general.architecture", "general.name", "general.file_type", "tokenizer.ggml.pre"}


def tensor_bytes(path: Path, name: str, dims: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of one tensor's data: whole blocks of its type (gguf-py's GGML_QUANT_SIZES)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise FormatError(f"{path}: tensor {name!r} has unknown GGML type {ggml_type}; the file is damaged or "
                          "from a newer llama.cpp") from None
    return math.prod(dims) // block * size


def inspect_gguf(path: str | Path, supported: tuple[str, ...] = SUPPORTED_ARCHS) -> GGUFInfo:
    """What a GGUF says about itself, and that its tensor data is all there. Read with formats.gguf.header's
    one-pass walk: gguf-py's GGUFReader builds a numpy view of every field first (3.2 s for SmolLM2's 49k-token
    vocabulary, before a check of that file had loaded anything)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file; pass the path of a .gguf model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                          "pass a .gguf model file")
    from formats.gguf.header import read_header

    try:
        values, tensors, start = read_header(path, HEADER_KEYS)
    except FormatError as e:
        raise FormatError(f"{path}: GGUF header is truncated or corrupt ({str(e).removeprefix(f'{path}: ')}); "
                          "re-download or re-export the file") from None
    end = max((start + offset + tensor_bytes(path, name, dims, t) for name, dims, t, offset in tensors), default=0)
    if end > size:
        raise FormatError(f"{path}: truncated: tensor data ends at byte {end} but the file has {size} bytes; "
                          "re-download or re-export the file")
    arch = values.get("general.architecture")
    if arch is None:
        raise FormatError(f"{path}: GGUF has no general.architecture key; is it a model file?")
    if arch not in supported:
        raise FormatError(f"{path}: architecture '{arch}' is not supported; supported: {', '.join(supported)}")
    return GGUFInfo(
        path=path,
        arch=str(arch),
        name=values.get("general.name"),
        n_tensors=len(tensors),
        file_type=values.get("general.file_type"),
        tensor_types={name: int(t) for name, _, t, _ in tensors},
        pre_tokenizer=values.get("tokenizer.ggml.pre"),
    )
