"""One entry point for the `lorax export --gguf` pipeline: HF dir -> GGUF files (+ LoRA GGUF), checked.

    lorax export ADAPTER --out dist --gguf --quant f32 --quant q8_0 --quant q4_k_m [--gguf-adapter]

    from formats.gguf.export import export_gguf
    result = export_gguf("merged/", "dist/", ["f16", "q4_k_m"])     # result.files: path, type, sha256

Direct types (f32/f16/bf16/q8_0) are written from the safetensors; libllama types are quantized from one
intermediate GGUF that holds the weights exactly (f32 for an f32 checkpoint, bf16 for bf16, ...), shared
by every libllama type of the run. Everything is built in a staging folder inside `out_dir`; the tokenizer
conformance check runs on a written GGUF, and only when it passes are the files moved into `out_dir`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from formats.errors import FormatError
from formats.fsutil import refuse_existing
from formats.gguf.adapter import write_lora_gguf
from formats.gguf.arch import caveats, hparams
from formats.gguf.quantize import LIBLLAMA_TYPES, Recipe, quantize_gguf
from formats.gguf.writer import DIRECT_TYPES, read_config, source_type, write_gguf
from lorax_common.hashing import sha256_file


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    type: str  # f32, f16, bf16, q8_0, q4_k_m, ...
    kind: str  # "model" or "lora"
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "type": self.type, "kind": self.kind, "sha256": self.sha256}


@dataclass
class GGUFExport:
    """The files written (iterate it like a list) and warnings worth showing the user (e.g. double BOS)."""

    files: list[GGUFFile]
    warnings: list[str] = field(default_factory=list)
    tokenizer_probes: int = 0
    source: GGUFFile | None = None  # libllama's source file, kept where GGUFOptions.keep_source said

    def __iter__(self) -> Iterator[GGUFFile]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def parse_quants(quants: Sequence[str]) -> list[str]:
    """Normalise --quant values (case, duplicates) and refuse unknown ones with the supported list."""
    out: list[str] = []
    for q in quants:
        q = q.strip().lower()
        if q not in DIRECT_TYPES and q not in LIBLLAMA_TYPES:
            raise FormatError(f"unknown --quant {q!r}; supported: {', '.join([*DIRECT_TYPES, *LIBLLAMA_TYPES])}")
        if q not in out:
            out.append(q)
    if not out:
        raise FormatError("no --quant given; pass at least one GGUF type, e.g. --quant q4_k_m")
    return out


@dataclass(frozen=True)
class GGUFOptions:
    adapter_dir: str | Path | None = None  # also write the adapter alone as {stem}-lora-f32.gguf
    stem: str = "model"  # files are {stem}-{type}.gguf
    name: str | None = None  # general.name (default: from the config)
    force: bool = False  # replace existing files of the same names
    check_tokenizer: bool = True  # the tokenizer conformance check on the first file written
    progress: bool = True
    nthread: int | None = None  # libllama quantizer threads (None: all cores)
    # a libllama type's importance matrix / tensor types (formats.gguf.quantize.Recipe)
    recipes: dict[str, Recipe] = field(default_factory=dict)
    # sha256 of every file written (GGUFFile.sha256): what lorax.json records of shipped files. False for files
    # that are only measured and deleted (the gate's control and floor): nothing reads their digest, and sha256
    # runs at ~1.3 GB/s here (0.4 s for the demo's 540 MB f32 control, ~1.7 s for a 1.18B bf16 one)
    digests: bool = True
    # a dir to move libllama's source file into (the exact type of the weights, written by this writer)
    # instead of deleting it: the gate measures it as the lossless control of the same weights
    keep_source: Path | None = None


def export_gguf(hf_dir: str | Path, out_dir: str | Path, quants: Sequence[str] = ("f16",),
                opts: GGUFOptions = GGUFOptions()) -> GGUFExport:
    """Write `{stem}-{type}.gguf` per quant type (and `{stem}-lora-f32.gguf` for `opts.adapter_dir`) into
    out_dir."""
    from formats.gguf.conformance import check_tokenizer as conformance
    from formats.gguf.tokenizer import load_hf_tokenizer, load_vocab

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    adapter_dir, stem, force, progress = opts.adapter_dir, opts.stem, opts.force, opts.progress
    qs = parse_quants(quants)
    targets = {q: out_dir / f"{stem}-{q}.gguf" for q in qs}
    if adapter_dir is not None:
        targets["lora"] = out_dir / f"{stem}-lora-f32.gguf"
    for path in targets.values():
        refuse_existing(path, force)

    cfg = read_config(hf_dir)
    hp = hparams(cfg)
    tok = load_hf_tokenizer(hf_dir)
    vocab = load_vocab(hf_dir, hp.vocab_size, tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", suffix=".tmp", dir=out_dir))
    try:
        staged = {key: staging / path.name for key, path in targets.items()}
        direct = [q for q in qs if q in DIRECT_TYPES]
        libllama = [q for q in qs if q in LIBLLAMA_TYPES]
        inter_type = source_type(hf_dir)
        inter = staged.get(inter_type, staging / f"intermediate-{inter_type}.gguf")
        # the first file written is the one libllama quantizes from (if any): check the tokenizer on it at
        # once, so a mismatch fails before minutes of quantization, not after
        writes = [(inter_type, inter)] if libllama else []
        writes += [(q, staged[q]) for q in direct if (q, staged[q]) not in writes]
        warnings: list[str] = caveats(cfg)
        probes = 0
        for i, (q, path) in enumerate(writes):
            write_gguf(hf_dir, path, q, vocab=vocab, name=opts.name, progress=progress)
            if i == 0 and opts.check_tokenizer:
                # every model file carries the same vocabulary (libllama copies it), so one check covers all
                report = conformance(tok, path)
                probes, warnings = report.probes, warnings + report.warnings
        for q in libllama:
            warnings += quantize_gguf(inter, staged[q], q, nthread=opts.nthread, recipe=opts.recipes.get(q))
        if adapter_dir is not None:
            write_lora_gguf(adapter_dir, hf_dir, staged["lora"], progress=progress)

        files = []
        for key, target in targets.items():
            digest = sha256_file(staged[key]) if opts.digests else ""
            os.replace(staged[key], target)
            kind = "lora" if key == "lora" else "model"
            files.append(GGUFFile(target, "f32" if key == "lora" else key, kind, digest))
        kept = None
        if opts.keep_source is not None and libllama and inter_type not in targets:
            kept_path = Path(opts.keep_source) / inter.name
            os.replace(inter, kept_path)  # not hashed: it is measured, not shipped
            kept = GGUFFile(kept_path, inter_type, "source", "")
        return GGUFExport(files, warnings, probes, kept)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
