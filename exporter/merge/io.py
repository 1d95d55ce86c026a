"""Files of `lorax merge`: base tensors in by row chunks, then the rest of the merged dir (config, tokenizer).

    lorax merge adapter/ --out merged/      # uses this to keep peak memory near one tensor chunk

Reading goes through `safe_open`, reopened per chunk: a handle keeps every page it touched mapped
(counted in RSS) until it is closed, which on a 2 GB shard is 2 GB of RSS. The weights go out through
formats.hf.writer (sharded safetensors written as chunks arrive).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from exporter.errors import LoraxError
from exporter.gate.reference import AdapterInfo
from formats.hf.writer import ST_DTYPES
from lorax_common.files import read_json_object, weight_files

CHUNK_ELEMS = 1 << 23  # rows per chunk hold about this many elements (32 MiB in float32)


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
    # transformers 5 saves a SentencePiece tokenizer (Gemma, Llama 2) as tokenizer.json alone, so an adapter dir
    # lacks the tokenizer.model llama.cpp's vocabulary is built from: the base's (the GGUF writer checks that the
    # two files agree on every piece)
    spm = "tokenizer.model"
    if not (out_dir / spm).exists() and (info.base_dir / spm).exists():
        shutil.copy2(info.base_dir / spm, out_dir / spm)
    patch_dir(out_dir)


def lorax_record(info: AdapterInfo, out_dir: Path, merge: dict[str, Any], weight_digests: dict[str, str]) -> dict:
    from datetime import UTC, datetime

    from lorax_common.hashing import sha256_file
    from lorax_common.versions import LORAX_VERSION, package_versions

    files = {p.name: weight_digests.get(p.name) or sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    base = {k: v for k, v in (info.lorax.base if info.lorax else {}).items() if k != "files"}
    base.update(path=str(info.base_dir.resolve()))
    return {"kind": "merged", "lorax_version": LORAX_VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "adapter": {"path": str(info.adapter_dir.resolve()),
                        "weights_sha256": sha256_file(info.adapter_dir / "adapter_model.safetensors")},
            "base": base, "trained_on": info.trained_on.as_dict(), "merge": merge, "files": files,
            "versions": package_versions()}
