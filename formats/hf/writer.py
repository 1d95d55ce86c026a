"""Sharded safetensors out, written as chunks arrive: what `lorax merge` streams the merged weights into.

    lorax merge adapter/ --out merged/      # peak memory stays near one tensor chunk

The `safetensors` package writes a file only from a complete dict of tensors (a whole shard in memory).
A safetensors file is an 8-byte little-endian header length, a JSON header of names, dtypes, shapes and
byte offsets, then the raw bytes; every output tensor's name, dtype and shape is known before the merge
starts, so the headers are written first and the bytes appended as each chunk is ready.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
# torch dtype -> safetensors header code
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


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


class AsyncWriter:
    """A ShardedWriter fed through a one-slot queue: writing and hashing chunk k overlaps computing k + 1.

    The caller must not reuse a tensor it passed until two more have been passed (one queued, one being
    written): exporter.merge.stream rotates three output buffers for that."""

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
