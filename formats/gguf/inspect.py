"""Validate a GGUF file before anything heavy reads it, and describe what it holds.

Bad files must fail with one line that names the problem, not a numpy traceback from deep
inside a memory map: check the magic, parse the header with gguf-py, check every tensor's data
lies inside the file (truncation), and check the architecture is one lorax carries end to end.
"""

from __future__ import annotations

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


def _field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def inspect_gguf(path: str | Path, supported: tuple[str, ...] = SUPPORTED_ARCHS) -> GGUFInfo:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file; pass the path of a .gguf model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                          "pass a .gguf model file")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py raises assorted errors on damaged headers
        raise FormatError(f"{path}: GGUF header is truncated or corrupt ({e.__class__.__name__}: {e}); "
                          "re-download or re-export the file") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise FormatError(f"{path}: truncated: tensor data ends at byte {end} but the file has {size} bytes; "
                          "re-download or re-export the file")
    arch = _field_value(reader, "general.architecture")
    if arch is None:
        raise FormatError(f"{path}: GGUF has no general.architecture key; is it a model file?")
    if arch not in supported:
        raise FormatError(f"{path}: architecture '{arch}' is not supported; supported: {', '.join(supported)}")
    return GGUFInfo(
        path=path,
        arch=str(arch),
        name=_field_value(reader, "general.name"),
        n_tensors=len(reader.tensors),
        file_type=_field_value(reader, "general.file_type"),
        tensor_types={t.name: int(t.tensor_type) for t in reader.tensors},
        pre_tokenizer=_field_value(reader, "tokenizer.ggml.pre"),
    )
