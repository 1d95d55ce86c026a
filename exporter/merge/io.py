"""Files of `lorax merge`: stream base tensors in, sharded safetensors out, then the rest of the merged dir.

    lorax merge adapter/ --out merged/      # uses this to keep peak memory near one tensor chunk

The `safetensors` package writes a file only from a complete dict of tensors (a whole shard in memory).
A safetensors file is an 8-byte little-endian header length, a JSON header of names, dtypes, shapes and
byte offsets, then the raw bytes; every output tensor's name, dtype and shape is known before the merge
starts, so the headers are written first and the bytes appended as each chunk is ready. Reading goes
through `safe_open`, reopened per chunk: a handle keeps every page it touched mapped (counted in RSS)
until it is closed, which on a 2 GB shard is 2 GB of RSS.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.errors import LoraxError
from exporter.gate.reference import AdapterInfo
from lorax_common.files import read_json_object, weight_files

# torch dtype -> safetensors dtype code
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"
CHUNK_ELEMS = 1 << 23  # rows per chunk hold about this many elements (32 MiB in float32)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def base_tensors(model_dir: Path) -> list[tuple[Path, str, tuple[int, ...], torch.dtype]]:
    """(file, key, shape, dtype) of every tensor of an HF checkpoint, shard by shard, in file order."""
    from safetensors import safe_open

    files = weight_files(model_dir)  # index entries inside the dir, headers that fit their files
    if not files:
        raise LoraxError(f"{model_dir} has no model.safetensors (or index); convert the base to safetensors first")
    code_to_dtype = {v: k for k, v in ST_DTYPES.items()}
    out = []
    for f in files:
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                sl = h.get_slice(key)
                dtype = code_to_dtype.get(sl.get_dtype())
                if dtype is None:
                    raise LoraxError(f"{f.name}: tensor {key} has dtype {sl.get_dtype()}, which lorax cannot merge")
                out.append((f, key, tuple(sl.get_shape()), dtype))
    return out


def read_rows(path: Path, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of one tensor (all of it when start is None); the file is unmapped on return."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as h:
        if start is None:
            return h.get_tensor(key)
        return h.get_slice(key)[start:stop]


def row_ranges(job, align: int) -> list[tuple[int, int] | None]:
    """Row ranges of about CHUNK_ELEMS elements (multiples of `align` rows), or [None] for the whole tensor."""
    if len(job.shape) < 2:
        return [None]
    rows, row_elems = job.shape[0], math.prod(job.shape[1:])
    step = max(align, (CHUNK_ELEMS // max(1, row_elems)) // align * align)
    if step >= rows:
        return [None]
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def read_job_rows(job, rows: tuple[int, int] | None) -> torch.Tensor:
    if job.replacement is not None:
        return job.replacement if rows is None else job.replacement[rows[0]:rows[1]]
    path, key = job.source
    return read_rows(path, key, *(rows or (None, None)))


class Buffers:
    """Grow-only scratch tensors reused across chunks (fresh pages per chunk cost page faults).

    `ring` > 1 hands out that many buffers in turn, for chunks still queued for the writer thread."""

    def __init__(self, ring: int = 1) -> None:
        self.bufs: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        self.ring, self.turn = ring, 0

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        self.turn = (self.turn + 1) % self.ring
        key = (dtype, self.turn)
        if key not in self.bufs or self.bufs[key].numel() < n:
            self.bufs[key] = torch.empty(n, dtype=dtype)
        return self.bufs[key][:n].view(shape)


class ShardedWriter:
    """Writes tensors, in the order of `specs`, into shards of at most `max_shard_bytes` (+ an index).

    Chunks of a tensor are appended with `write`; `close` checks every byte arrived and returns the
    sha256 of each file written (computed on the way out, no second read).
    """

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.order = [(i, s) for i, shard in enumerate(shards) for s in shard]
        self.pos = 0  # index into self.order of the tensor being written
        self.written = 0  # bytes of that tensor written so far
        self.file = None
        self.hash = None
        self.digests: dict[str, str] = {}
        self.current_shard = -1

    def _open(self, i: int) -> None:
        self._finish_file()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in self.shards[i]:
            header[s.name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes so data stays aligned
        self.file = open(self.out_dir / self.names[i], "wb")
        self.hash = hashlib.sha256()
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self.current_shard = i

    def _emit(self, data) -> None:
        self.file.write(data)
        self.hash.update(data)

    def _finish_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.digests[self.names[self.current_shard]] = self.hash.hexdigest()
            self.file = None

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next chunk (leading rows) of tensor `name`; tensors must come in spec order."""
        shard, spec = self.order[self.pos]
        if name != spec.name or chunk.dtype != spec.dtype:
            raise AssertionError(f"writer expected {spec.name} ({spec.dtype}), got {name} ({chunk.dtype})")
        if shard != self.current_shard:
            self._open(shard)
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self.written += data.nbytes
        if self.written > spec.nbytes:
            raise AssertionError(f"writer got more bytes than {spec.name} holds")
        if self.written == spec.nbytes:
            self.pos += 1
            self.written = 0

    def close(self) -> dict[str, str]:
        if self.pos != len(self.order):
            raise AssertionError(f"writer closed after {self.pos} of {len(self.order)} tensors")
        self._finish_file()
        if len(self.names) > 1:
            weight_map = {s.name: self.names[i] for i, s in self.order}
            total = sum(s.nbytes for _, s in self.order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return dict(self.digests)

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def write_support_files(info: AdapterInfo, out_dir: Path, out_dtype: str, untied: bool) -> None:
    """config (no quantization settings, legacy keys), generation config, tokenizer and chat template."""
    from formats.hf.compat import patch_dir

    cfg = read_json_object(info.base_dir / "config.json", "a Hugging Face model config")
    cfg.pop("quantization_config", None)
    cfg["dtype"] = cfg["torch_dtype"] = out_dtype  # transformers 5 reads dtype, 4.x torch_dtype
    if untied:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = next((d / "generation_config.json" for d in (info.adapter_dir, info.base_dir)
                if (d / "generation_config.json").exists()), None)
    if gen is not None:
        shutil.copy2(gen, out_dir / "generation_config.json")
    # Training may have saved its own tokenizer (chat template, pad token): prefer the adapter's.
    tok_dir = info.adapter_dir if (info.adapter_dir / "tokenizer_config.json").exists() else info.base_dir
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy2(tok_dir / name, out_dir / name)
    patch_dir(out_dir)


def lorax_record(info: AdapterInfo, out_dir: Path, merge: dict[str, Any], weight_digests: dict[str, str]) -> dict:
    from datetime import UTC, datetime

    from exporter import __version__
    from exporter.versions import package_versions
    from formats.fsutil import sha256_file

    files = {p.name: weight_digests.get(p.name) or sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    base = {k: v for k, v in ((info.lorax or {}).get("base") or {}).items() if k != "files"}
    base.update(path=str(info.base_dir.resolve()))
    return {"kind": "merged", "lorax_version": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "adapter": {"path": str(info.adapter_dir.resolve()),
                        "weights_sha256": sha256_file(info.adapter_dir / "adapter_model.safetensors")},
            "base": base, "trained_on": info.trained_on.as_dict(), "merge": merge, "files": files,
            "versions": package_versions()}


class AsyncWriter:
    """A ShardedWriter fed through a one-slot queue: writing and hashing chunk k overlaps computing k + 1.

    The caller must not reuse a tensor it passed until two more have been passed (one queued, one being
    written): merge.py rotates three output buffers for that."""

    def __init__(self, writer: ShardedWriter) -> None:
        import queue
        import threading

        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lorax-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller on its next call
                    self.error = e

    def write(self, name: str, chunk: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((name, chunk))

    def close(self) -> dict[str, str]:
        self._stop()
        if self.error is not None:
            raise self.error
        return self.writer.close()

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def abort(self) -> None:
        self._stop()
        self.writer.abort()
