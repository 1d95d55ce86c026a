"""K-quants, i-quants and legacy block quants through libllama's `llama_model_quantize` (llama-cpp-python's ctypes).

    lorax export ADAPTER --out dist --gguf --quant q4_k_m --quant q6_k      # --imatrix auto: weighed by the data
    lorax export ADAPTER --out dist --gguf --quant q4_k_m --tensor-type ffn_down=q6_k --output-type q8_0

gguf-py cannot write K-quants, and a re-implementation would drift from llama.cpp's mixes (q4_k_m keeps
some tensors at q6_k, falls back per tensor when rows do not fit 256-blocks). So every type here is made
by libllama itself from one f32/f16/bf16 GGUF intermediate written by `formats.gguf.writer`; several
types in one export reuse that one intermediate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from formats.errors import FormatError
from formats.fsutil import atomic_file
from formats.gguf.imatrix import Imatrix, c_imatrix
from formats.gguf.llama_log import capture_llama_log

# --quant name -> llama_cpp ftype constant (which of them lorax offers is exporter.gate.registry's business)
LIBLLAMA_TYPES: dict[str, str] = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "iq3_m": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "iq3_s": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "iq3_xxs": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "iq2_m": "LLAMA_FTYPE_MOSTLY_IQ2_M",
    "iq2_xxs": "LLAMA_FTYPE_MOSTLY_IQ2_XXS",
}
# i-quants libllama refuses to make without an importance matrix (llama-quant.cpp tensor_requires_imatrix)
NEEDS_IMATRIX = frozenset({"iq3_xxs", "iq2_m", "iq2_xxs"})
# per-tensor storage types (--tensor-type PATTERN=TYPE, --output-type, --embedding-type) -> ggml_type
GGML_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q5_0", "q4_0", "iq4_xs",
              "iq4_nl", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xxs")


@dataclass(frozen=True)
class Recipe:
    """How one quantized file is made beyond its type: the importance matrix and per-tensor types.

    `tensor_types` are (regex, type) pairs matched against GGUF tensor names (`blk.3.ffn_down.weight`)
    in order, first match wins, as `llama-quantize --tensor-type` does."""

    imatrix: Imatrix | None = None
    tensor_types: tuple[tuple[str, str], ...] = ()
    output_type: str | None = None
    embedding_type: str | None = None
    # token ids of the calibration rows, for quantizers that run the model on them (ONNX int4's GPTQ)
    calibration: tuple[tuple[int, ...], ...] = ()

    @property
    def plain(self) -> bool:
        return self == Recipe()

    def identity(self) -> list:
        """What the quantized bytes depend on beyond the type and the source file (JSON-able, for cache keys)."""
        out = [None if self.imatrix is None else self.imatrix.digest(), [list(t) for t in self.tensor_types],
               self.output_type, self.embedding_type]
        if self.calibration:
            import hashlib

            out.append(hashlib.sha256(repr(self.calibration).encode()).hexdigest())
        return out

    def describe(self) -> dict:
        return {"imatrix": None if self.imatrix is None else {"tokens": self.imatrix.tokens,
                                                              "tensors": len(self.imatrix.sums)},
                "tensor_types": [f"{p}={t}" for p, t in self.tensor_types],
                "output_type": self.output_type, "embedding_type": self.embedding_type}


def ggml_type(name: str) -> int:
    from gguf import GGMLQuantizationType  # gguf-py's copy of ggml's enum (the binding lacks BF16)

    key = name.strip().lower()
    if key not in GGML_TYPES:
        raise FormatError(f"tensor type {name!r} is not offered; choose from {', '.join(GGML_TYPES)}")
    return int(GGMLQuantizationType[key.upper()])


def _c_overrides(pairs: tuple[tuple[str, str], ...]):
    import llama_cpp

    arr = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
    for i, (pattern, t) in enumerate(pairs):
        arr[i].pattern, arr[i].type = pattern.encode(), ggml_type(t)
    arr[len(pairs)].pattern = None
    return arr


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, *, nthread: int | None = None,
                  force: bool = False, recipe: Recipe | None = None) -> list[str]:
    """Quantize the f32/f16/bf16 GGUF `src` into `dst` with libllama (atomically); returns its warnings.

    `recipe` passes an importance matrix (`llama_model_quantize_params.imatrix`), tensor-type overrides
    (`tt_overrides`) and the output/token-embedding types to the same call."""
    import ctypes

    import llama_cpp

    if qtype not in LIBLLAMA_TYPES:
        raise FormatError(f"--quant {qtype} is not a libllama type; supported: {', '.join(LIBLLAMA_TYPES)}")
    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LIBLLAMA_TYPES[qtype])
    params.nthread = nthread or os.cpu_count() or 1
    recipe = recipe or Recipe()
    if qtype in NEEDS_IMATRIX and recipe.imatrix is None:
        raise FormatError(f"--quant {qtype} needs an importance matrix; pass --imatrix auto (or a file)")
    keep = []  # C buffers that must outlive the call
    if recipe.imatrix is not None:
        arr, bufs = c_imatrix(recipe.imatrix.values())
        params.imatrix, keep = arr, [arr, bufs]
    if recipe.tensor_types:
        tt = _c_overrides(recipe.tensor_types)
        params.tt_overrides = tt
        keep.append(tt)
    if recipe.output_type:
        params.output_tensor_type = ggml_type(recipe.output_type)
    if recipe.embedding_type:
        params.token_embedding_type = ggml_type(recipe.embedding_type)
    with atomic_file(dst, force=force) as tmp, capture_llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            reason = next((line.strip() for line in reversed(log)
                           if any(w in line.lower() for w in ("error", "invalid", "failed"))), "no reason logged")
            raise FormatError(f"llama_model_quantize failed making {qtype} from {src.name}: {reason}")
    # e.g. "15 of 21 tensor(s) required fallback quantization" when rows do not fit the type's blocks
    return [f"{qtype}: {line.split('WARNING:', 1)[1].strip()}" for line in log if "fallback quantization" in line]
