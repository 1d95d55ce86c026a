"""K-quants and legacy block quants through libllama's `llama_model_quantize` (llama-cpp-python's ctypes binding).

    lorax export ADAPTER --out dist --gguf --quant q4_k_m --quant q6_k

gguf-py cannot write K-quants, and a re-implementation would drift from llama.cpp's mixes (q4_k_m keeps
some tensors at q6_k, falls back per tensor when rows do not fit 256-blocks). So every type here is made
by libllama itself from one f32/f16/bf16 GGUF intermediate written by `formats.gguf.writer`; several
types in one export reuse that one intermediate.
"""

from __future__ import annotations

import os
from pathlib import Path

from formats.errors import FormatError
from formats.fsutil import atomic_file
from formats.gguf.llama_log import capture_llama_log

# --quant name -> llama_cpp ftype constant. i-quants that need an importance matrix are left out.
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
}


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, *, nthread: int | None = None,
                  force: bool = False) -> list[str]:
    """Quantize the f32/f16/bf16 GGUF `src` into `dst` with libllama (atomically); returns its warnings."""
    import ctypes

    import llama_cpp

    if qtype not in LIBLLAMA_TYPES:
        raise FormatError(f"--quant {qtype} is not a libllama type; supported: {', '.join(LIBLLAMA_TYPES)}")
    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LIBLLAMA_TYPES[qtype])
    params.nthread = nthread or os.cpu_count() or 1
    with atomic_file(dst, force=force) as tmp, capture_llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            reason = next((line.strip() for line in reversed(log) if "error" in line.lower()), "no reason logged")
            raise FormatError(f"llama_model_quantize failed making {qtype} from {src.name}: {reason}")
    # e.g. "15 of 21 tensor(s) required fallback quantization" when rows do not fit the type's blocks
    return [f"{qtype}: {line.split('WARNING:', 1)[1].strip()}" for line in log if "fallback quantization" in line]
