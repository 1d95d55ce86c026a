"""Validated readers for the files every lorax command opens: checked where opened, named in the error.

    read_json_object(adapter / "adapter_config.json", "a PEFT adapter config")
    weight_files(base_dir)          # safetensors (or index) whose headers and entries are sane

Deep libraries fail on bad files with tracebacks that name neither the file nor the fix (JSONDecodeError
from tokenizers, a panic from safetensors' Rust reader, UnicodeDecodeError mid-iteration). These checks
are cheap (headers only) and run before any of them sees the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lorax_common.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors' own reader refuses headers above 100 MB (a sane header is KBs: names, dtypes, offsets)
MAX_HEADER_BYTES = 100 * 1000 * 1000
# tokenizer files that are JSON: transformers/tokenizers parse them and die with a bare JSONDecodeError
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def decode_utf8(data: bytes, path: str | Path) -> str:
    """bytes -> str, or one line naming the file, line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); "
                        "save the file as UTF-8") from None


def read_utf8(path: str | Path) -> str:
    return decode_utf8(Path(path).read_bytes(), path)


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (`what` says what it should be, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: {what}")
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object ({what}); fix or regenerate it")
    return data


def check_tokenizer_files(model_dir: str | Path) -> None:
    """Every JSON tokenizer file in a dir parses (the error names it, not tokenizers' bare JSONDecodeError)."""
    for name in TOKENIZER_JSON:
        path = Path(model_dir) / name
        if path.exists():
            read_json_object(path, "a tokenizer file; re-save the tokenizer with save_pretrained")


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking it fits the file and every tensor does too."""
    path = Path(path)
    fix = "re-download or re-save the weights"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise UserError(f"{path}: safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES}): the file is "
                            f"corrupt; {fix}")
        if 8 + n > size:
            raise UserError(f"{path}: truncated safetensors header ({n} bytes declared, {size - 8} present); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: safetensors header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is not a JSON object; {fix}")
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise UserError(f"{path}: tensor {name!r} has no valid data_offsets in the header; {fix}")
        if not 0 <= offsets[0] <= offsets[1] <= data_bytes:
            raise UserError(f"{path}: truncated: tensor {name!r} ends at byte {offsets[1]} of the data but the file "
                            f"holds {data_bytes}; {fix}")
    return header


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF model dir (index or single file), each inside the dir and sane."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        weight_map = read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to file names; fix or regenerate it")
        root = model_dir.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            f = (model_dir / name).resolve()
            # an index entry is a file name in the dir: `../../x` or `/etc/passwd` is not a shard of this model
            if f.parent != root and root not in f.parents:
                raise UserError(f"{index}: entry {name!r} points outside {model_dir}; shards must lie in the "
                                "model dir; fix the index")
            if not f.is_file():
                raise UserError(f"{index}: shard {name!r} is missing from {model_dir}; re-download the model")
            files.append(model_dir / name)
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        return []
    for f in files:
        safetensors_header(f)
    return files


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; a missing file, non-UTF-8 bytes or bad YAML is one line naming file and line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path")
    text = read_utf8(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); fix the file") from None
