"""Load the base as training sees it (bitsandbytes 4-bit or plain) and wrap it with PEFT LoRA.

    lorax train --base base/ --quant nf4|fp4|none --double-quant/--no-double-quant --compute-dtype auto
                --rank 16 --alpha 32 --target-modules all-linear --use-rslora

What is loaded here is what the merge and the parity gate must rebuild, so `quant_record` reads the
settings back from the loaded layers (blocksize, double quant, the dtype the weights had when they
were quantized) instead of repeating what was asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lorax_common import base_as_trained
from lorax_common.base_as_trained import pin_4bit_layout  # noqa: F401 - train.model.pin_4bit_layout callers
from lorax_common.record import Quantization
from train.config import TrainConfig
from train.errors import TrainError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_compute_dtype(cuda: bool, bf16_ok: bool) -> str:
    """float32 on CPU (a bf16 step measured 15x slower there), bf16 on CUDA when the GPU has it."""
    if not cuda:
        return "float32"
    return "bfloat16" if bf16_ok else "float16"


def compute_dtype(cfg: TrainConfig) -> str:
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    cuda = torch.cuda.is_available()
    return auto_compute_dtype(cuda, cuda and torch.cuda.is_bf16_supported())


def resolve_base(base: str) -> Path:
    """A local model dir, or a hub id fetched to the local cache (needs network) and used from there."""
    path = Path(base)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TrainError(f"base {path} has no config.json; pass a Hugging Face model directory")
        return path.resolve()
    if path.exists() or base.count("/") != 1:
        raise TrainError(f"base {base} is not a model directory; pass a local HF dir (or an org/name hub id when online)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all the same advice
        raise TrainError(f"base {base} is not a local directory and could not be fetched from the hub "
                         f"({e.__class__.__name__}); download it and pass the directory") from None


def device_map() -> dict[str, int] | None:
    # Under torchrun each process owns the GPU of its local rank; on CPU there is nothing to place.
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        # Padding positions are masked (attention 0, label -100), so which id fills them does not matter.
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: TrainConfig, base: Path):
    """The base model as training uses it: 4-bit via bitsandbytes (or plain) in the resolved dtypes."""
    compute = compute_dtype(cfg)
    # bitsandbytes dequantizes to the dtype the weight was loaded in, so loading in the compute dtype keeps
    # the 4-bit matmul free of extra rounding (the exporter's reference assumes the same default)
    load = compute if cfg.load_dtype == "auto" else cfg.load_dtype
    asked = Quantization("none") if cfg.quant == "none" else Quantization(
        "bnb-4bit", cfg.quant, double_quant=cfg.double_quant, compute_dtype=compute)
    try:
        model = base_as_trained.load(base, asked, load, device_map())
    except (OSError, ValueError) as e:
        raise TrainError(f"could not load base {base}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def first_4bit_weight(model):
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            return module.weight
    return None


def quant_record(cfg: TrainConfig, model, base: Path) -> tuple[dict[str, Any], str]:
    """(lorax.json "quantization", storage dtype) read back from the loaded model."""
    compute = compute_dtype(cfg)
    if cfg.quant == "none":
        load = _dtype_name(model.get_input_embeddings().weight)
        return {"method": "none", "compute_dtype": compute, "load_dtype": load}, load
    w = first_4bit_weight(model)
    if w is None:
        raise TrainError(f"base {base} loaded without any 4-bit layer; pass --quant none for plain LoRA")
    qs = w.quant_state
    record = {
        "method": "bnb-4bit",
        "quant_type": qs.quant_type,
        "blocksize": int(qs.blocksize),
        "double_quant": bool(qs.nested),
        "compute_dtype": compute,
        "quant_storage": _dtype_name(w),
        # quant_state.dtype is the dtype the weight had when bitsandbytes quantized it: the merge must
        # re-quantize from the same dtype to get the same 4-bit codes
        "load_dtype": str(qs.dtype).replace("torch.", ""),
        # double quant's mean(absmax) is a torch reduction whose last bit depends on the thread count on big
        # weights (exporter.merge.quant4.Quant4Spec.threads): the merge repeats it with this many threads
        "torch_threads": torch.get_num_threads(),
    }
    return record, record["load_dtype"]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def unquantized_dtype(peft_model) -> str:
    """dtype of the base parameters left unquantized (embeddings, norms, head) as training ran them:
    prepare_model_for_kbit_training upcasts them to float32, so a faithful reference must too."""
    return _dtype_name(peft_model.get_input_embeddings().weight)


def wrap_lora(cfg: TrainConfig, model):
    """Attach a fresh LoRA adapter (seeded by the caller) to a loaded base."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quant != "none":
        # casts the non-4-bit parameters (norms, embeddings) to float32 and makes inputs require grads
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise TrainError(f"LoRA target_modules {cfg.target_modules!r} do not fit this model "
                         f"({str(e).splitlines()[0]}); use all-linear or names of its Linear layers") from None


def lora_record(peft_model) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    pc = peft_model.peft_config["default"]
    # short names of the layers that really got an adapter ("all-linear" resolved), so merge needs no PEFT logic
    targets = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    return {
        "r": pc.r,
        "alpha": pc.lora_alpha,
        "dropout": pc.lora_dropout,
        "target_modules": sorted(targets),
        "use_rslora": bool(pc.use_rslora),
        "modules_to_save": sorted(pc.modules_to_save) if pc.modules_to_save else None,
    }
