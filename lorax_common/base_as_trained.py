"""The one invariant, written once: load the base exactly as training loaded it.

    lorax train ...                       # train.model.load_base
    lorax merge / check adapter/          # exporter.gate.reference.load_reference (the model every artifact is measured against)

From the recorded quantization (lorax_common.record.Quantization): the same BitsAndBytesConfig, the same
load dtype, and the same 4-bit compute path (pin_4bit_layout). Tests build their references through it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorax_common.errors import UserError
from lorax_common.record import Quantization


def bnb_config(q: Quantization):
    """transformers' BitsAndBytesConfig for a recorded 4-bit quantization."""
    import torch
    from transformers import BitsAndBytesConfig

    if q.blocksize != 64:
        raise UserError(f"blocksize {q.blocksize}: transformers' bitsandbytes loader only quantizes with "
                        "blocksize 64, so this training setup cannot be rebuilt as a reference")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype or "float32"),
                              bnb_4bit_quant_storage=getattr(torch, q.quant_storage))


def load(base_dir: str | Path, q: Quantization, dtype: str, device_map: dict[str, Any] | None = None):
    """The base model in `dtype`, 4-bit as `q` says (plain when q.method is "none"), pinned to training's layout."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "device_map": device_map}
    if q.method == "bnb-4bit":
        kwargs.update(quantization_config=bnb_config(q), device_map=device_map or {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    pin_4bit_layout(model)
    return model


def pin_4bit_layout(model) -> int:
    """Keep every bitsandbytes Linear4bit on the layout training computes with; returns how many.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit for a faster kernel the first time it
    runs in eval mode without grad, and keeps it repacked: absmax rounded to bf16, and a kernel with no
    autograd formula. Trainer's eval_on_start is such a run, so training then backpropagated through that
    kernel -- PyTorch warned, and the gradient through every frozen base matmul was silently dropped
    (measured here, AMD EPYC with avx512_bf16). The reference must not see the bf16 absmax either: training
    never computed with it. The plain dequantize+matmul path is exact and differentiable.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n
