"""HF model directory -> one GGUF file (f32, f16, bf16 or q8_0), streamed tensor by tensor.

    lorax export ADAPTER --out dist --gguf --quant f16      (formats.gguf.export calls write_gguf)

Memory stays bounded by one tensor chunk, not the model: every tensor's shape is known from the
safetensors headers, so gguf-py's writer state machine can write header, metadata and tensor index first
and then each tensor's data in order. Tensors are read in row chunks, each through its own `safe_open`
(so its mapped pages are released as soon as it is written), converted with torch, and appended.
Measured on a 1.18B bf16 checkpoint (scripts/bench_gguf.py): 0.52 GB peak RSS, llama.cpp's converter
1.01 GB. Which tensors stay F32 (1-D norms and biases, rope factors) and when q8_0 falls back to f16
(rows not a multiple of 32) follow llama.cpp's file conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf import MODEL_TENSOR as T

from formats.errors import FormatError
from formats.fsutil import atomic_file
from formats.gguf import arch as archmod
from formats.gguf.names import gguf_name
from formats.gguf.tokenizer import Vocab, load_vocab
from lorax_common.files import read_json_object, safetensors_header, weight_files

Q = GGMLQuantizationType

# --quant names this module writes itself -> (tensor type for 2-D weights, general.file_type)
DIRECT_TYPES: dict[str, tuple[Q, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# safetensors dtype -> the direct type that holds it exactly (the intermediate for libllama quantization)
EXACT_TYPE = {"F32": "f32", "BF16": "bf16", "F16": "f16"}

# rows are converted in chunks of about this many elements (bounds memory for big embeddings)
CHUNK_ELEMS = 16 * 1024 * 1024


def _encode_q8_0(t) -> np.ndarray:
    from gguf.quants import quantize

    return quantize(t.float().numpy(), Q.Q8_0)


def _encode_bf16(t) -> np.ndarray:
    import torch

    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()


# tensor type -> torch tensor chunk -> bytes-ready numpy array (torch converts, and rounds bf16 to nearest even)
ENCODE: dict[Q, Callable[[Any], np.ndarray]] = {
    Q.F32: lambda t: t.float().numpy(),
    Q.F16: lambda t: t.half().numpy(),
    Q.BF16: _encode_bf16,
    Q.Q8_0: _encode_q8_0,
}


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where its data comes from and how it is stored."""

    name: str
    shape: tuple[int, ...]  # row-major (numpy/HF) order
    qtype: Q
    source: Path | None = None  # safetensors file; None for generated tensors
    hf_name: str | None = None
    permute_heads: int | None = None  # q/k rows reordered per head (llama rope layout)
    data: np.ndarray | None = None  # generated tensors (rope factors)
    shift: float = 0.0  # added to every value (Gemma's (1 + w) norms, stored as llama.cpp multiplies them)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FormatError(f"{hf_dir}: no config.json; pass a Hugging Face model directory (merged or base)")
    cfg = read_json_object(path, "a Hugging Face model config")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise FormatError(f"{hf_dir} holds {method}-quantized weights; export the merged (dequantized) model "
                          "directory instead")
    return cfg


def safetensors_files(hf_dir: Path) -> list[Path]:
    files = weight_files(hf_dir)  # index entries inside the dir, headers that fit their files
    if not files:
        files = sorted(hf_dir.glob("*.safetensors"))
        for f in files:
            safetensors_header(f)
    if not files:
        raise FormatError(f"{hf_dir}: no *.safetensors weights; save the model with safe_serialization=True")
    return files


def source_type(hf_dir: Path) -> str:
    """The direct GGUF type that holds the checkpoint's weights exactly (f32 when they are anything else)."""
    from safetensors import safe_open

    with safe_open(safetensors_files(hf_dir)[0], "pt") as f:
        key = next(iter(f.keys()))
        return EXACT_TYPE.get(f.get_slice(key).get_dtype(), "f32")


def tensor_type(kind: T, shape: tuple[int, ...], out: Q) -> Q:
    """Storage type of one tensor in a file of type `out`."""
    if len(shape) < 2 or kind == T.ROPE_FREQS:
        return Q.F32  # norms, biases and rope factors stay F32 in every llama.cpp file type
    block = GGML_QUANT_SIZES[out][0]
    return out if shape[-1] % block == 0 else Q.F16


def plan_tensors(hf_dir: Path, spec: archmod.ArchSpec, hp: archmod.HParams, out: Q,
                 extra: dict[str, np.ndarray]) -> list[TensorPlan]:
    from safetensors import safe_open

    plans: list[tuple[tuple, TensorPlan]] = []
    for path in safetensors_files(hf_dir):
        with safe_open(path, "pt") as f:
            for hf_name in f.keys():
                mapped = archmod.gguf_tensor_name(spec, hf_name)
                if mapped is None or (hf_name == "lm_head.weight" and hp.tied):
                    continue  # tied lm_head: llama.cpp reuses token_embd when `output` is absent
                name, kind, bid = mapped
                shape = tuple(f.get_slice(hf_name).get_shape())
                heads = None
                if spec.permute_qk and kind in archmod.QK_ROWS:
                    heads = hp.n_head_kv if archmod.QK_ROWS[kind] else hp.n_head
                order = (1, bid, name) if bid is not None else (0 if kind == T.TOKEN_EMBD else 2, 0, name)
                plans.append((order, TensorPlan(name, shape, tensor_type(kind, shape, out), path, hf_name, heads,
                                                shift=spec.shift(kind))))
    names = {p.name for _, p in plans}
    if "token_embd.weight" not in names:
        raise FormatError(f"{hf_dir}: no model.embed_tokens.weight in the safetensors files")
    if not hp.tied and "output.weight" not in names:
        raise FormatError(f"{hf_dir}: tie_word_embeddings is false but there is no lm_head.weight")
    plans.sort(key=lambda x: x[0])
    gen = [TensorPlan(n, tuple(a.shape), Q.F32, data=a) for n, a in sorted(extra.items())]
    return [p for _, p in plans] + gen


def _chunks(plan: TensorPlan) -> Iterator[Any]:
    """The tensor's rows as torch tensors, a chunk at a time (whole tensor when rows must be permuted)."""
    import torch
    from safetensors import safe_open

    if plan.data is not None:
        yield torch.from_numpy(plan.data)
        return
    if plan.permute_heads:  # q/k rows move across the whole tensor: read it at once (hidden x hidden at most)
        with safe_open(plan.source, "pt") as f:
            yield archmod.permute_qk(f.get_slice(plan.hf_name)[:], plan.permute_heads)
        return
    row = math.prod(plan.shape[1:]) or 1
    step = max(1, CHUNK_ELEMS // row)
    for r0 in range(0, plan.shape[0], step):
        # A fresh safe_open per chunk: the file's mapped pages count as resident until it is closed, so
        # keeping it open would grow RSS by the whole tensor (or shard); reopening costs one header parse.
        with safe_open(plan.source, "pt") as f:
            chunk = f.get_slice(plan.hf_name)[r0:r0 + step]
        yield chunk


class _StreamedTensor:
    """What gguf-py's `write_tensor_data` needs from an array (`nbytes`, `tofile`), filled chunk by chunk."""

    def __init__(self, plan: TensorPlan, bar) -> None:
        self.plan, self.bar, self.nbytes = plan, bar, plan.nbytes

    def tofile(self, fout) -> None:
        written = 0
        for chunk in _chunks(self.plan):
            if self.plan.shift:
                chunk = chunk.float() + self.plan.shift  # in float32, then stored as the file's type
            arr = ENCODE[self.plan.qtype](chunk)
            arr.tofile(fout)
            written += arr.nbytes
            self.bar.update(arr.nbytes)
        if written != self.nbytes:
            raise FormatError(f"{self.plan.name}: wrote {written} bytes, expected {self.nbytes}")


def write_gguf(hf_dir: str | Path, out_path: str | Path, out_type: str = "f16", *, vocab: Vocab | None = None,
               name: str | None = None, force: bool = False, progress: bool = True) -> Path:
    """Convert `hf_dir` into one GGUF at `out_path` (written atomically) and return the path."""
    if out_type not in DIRECT_TYPES:
        raise FormatError(f"--quant {out_type} is not written directly; direct types: {', '.join(DIRECT_TYPES)}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    qtype, ftype = DIRECT_TYPES[out_type]
    cfg = read_config(hf_dir)
    spec = archmod.arch_spec(cfg)
    hp = archmod.hparams(cfg)
    items, extra = archmod.model_metadata(spec, hp, cfg)
    plans = plan_tensors(hf_dir, spec, hp, qtype, extra)
    vocab = vocab or load_vocab(hf_dir, hp.vocab_size)

    w = GGUFWriter(path=None, arch=spec.name)
    w.add_type("model")
    w.add_name(gguf_name(name or hf_dir.name, vocab.tokens, vocab.types, vocab.rstrip))
    w.add_file_type(int(ftype))
    w.add_quantization_version(GGML_QUANT_VERSION)
    for key, value, vtype in items:
        w.add_key_value(key, value, vtype)
    vocab.add_to(w)

    write_streamed(w, plans, out_path, force=force, desc=f"gguf {out_type}", progress=progress)
    return out_path


def write_streamed(w: GGUFWriter, plans: list[TensorPlan], out_path: Path, *, force: bool, desc: str,
                   progress: bool) -> None:
    """Write a GGUF whose metadata is already in `w`: tensor index from `plans`, then data tensor by tensor."""
    from lorax_common.log import progress as bar_of

    for p in plans:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    with atomic_file(out_path, force=force) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(p.nbytes for p in plans)
            with bar_of(total=total, unit="B", unit_scale=True, desc=desc, enabled=progress) as bar:
                for p in plans:
                    w.write_tensor_data(_StreamedTensor(p, bar))  # type: ignore[arg-type]
        finally:
            w.close()
