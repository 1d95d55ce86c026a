"""Random LoRA adapters on tiny bases, saved the way `lorax train` saves them (PEFT dir + lorax.json).

Tests cannot wait for a training run: an adapter with random, non-zero LoRA weights exercises the same
merge math. `make_adapter` returns the in-memory PEFT model it saved, which *is* the reference (the base
loaded as in training + the adapter), so tests compare against it without loading twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_EXAMPLES = [
    {"messages": [{"role": "user", "content": "Name a city."}, {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one two three"}]},
    {"messages": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "blue"}]},
]


def load_base(base_dir: Path, trained_on: str = "nf4", double_quant: bool = False, load_dtype: str = "float32",
              compute_dtype: str = "float32"):
    """The base as training loads it (lorax_common.base_as_trained): bnb 4-bit or plain."""
    from lorax_common import base_as_trained
    from lorax_common.record import Quantization

    q = Quantization("none") if trained_on == "none" else Quantization(
        "bnb-4bit", trained_on, double_quant=double_quant, compute_dtype=compute_dtype)
    return base_as_trained.load(base_dir, q, load_dtype)


@dataclass(frozen=True)
class LoraSpec:
    """The random adapter make_adapter saves (PEFT LoraConfig fields plus how it is initialised)."""

    use_rslora: bool = False
    r: int = 8
    alpha: int = 16
    target_modules: Any = "all-linear"
    seed: int = 0
    lorax_json: bool = True  # False: a plain PEFT dir (the reader must be told --trained-on)
    load_dtype: str = "float32"
    compute_dtype: str = "float32"  # bnb_4bit_compute_dtype (bfloat16: training on a bf16 GPU)
    std: float = 0.1
    peft_config: Any = None  # a full LoraConfig instead of the fields above
    extra: dict = field(default_factory=dict)  # further LoraConfig keywords (lora_bias, modules_to_save, ...)


def make_adapter(base_dir: Path, out_dir: Path, trained_on: str = "nf4", double_quant: bool = False,
                 spec: LoraSpec = LoraSpec()):
    """Save a random LoRA adapter for `base_dir` at `out_dir`; return the PEFT model (the reference)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base = load_base(base_dir, trained_on, double_quant, spec.load_dtype, spec.compute_dtype)
    config = spec.peft_config or LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=spec.target_modules,
                                            lora_dropout=0.0, use_rslora=spec.use_rslora, init_lora_weights=False,
                                            **spec.extra)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Trainable adapter weights (LoRA, LoRA biases, modules_to_save copies): random, non-zero.
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * spec.std
                        + (p if "modules_to_save" in name else 0))
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    (out_dir / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVAL_EXAMPLES))
    if spec.lorax_json:
        write_training_record(base_dir, out_dir, trained_on, double_quant, spec.load_dtype, config,
                              spec.compute_dtype)
    return model


def write_training_record(base_dir: Path, out_dir: Path, trained_on: str, double_quant: bool, load_dtype: str,
                          config, compute_dtype: str = "float32") -> dict:
    """lorax.json through the code `lorax train` writes it with (train.lorax_json + lorax_common.record):
    the same keys, schema version and base checksum; only the training facts are those of a random adapter."""
    from lorax_common import record
    from train.lorax_json import base_record, build

    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    quant = {"method": "none"} if trained_on == "none" else {
        "method": "bnb-4bit", "quant_type": trained_on, "blocksize": 64, "double_quant": double_quant,
        "compute_dtype": compute_dtype, "quant_storage": "uint8", "load_dtype": load_dtype}
    targets = config.target_modules
    lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, set) else targets,
            "use_rslora": config.use_rslora, "modules_to_save": config.modules_to_save}
    data = {"path": "/dev/null", "sha256": "", "format": "messages", "eval_fraction": 0.1,
            "eval_file": "eval.jsonl", "max_seq_len": 512, "truncated": 0}
    rec = build(base=base_record(Path(base_dir), cfg.get("dtype", "float32"), cfg["model_type"]), quantization=quant,
                lora=lora, data=data, seed=0, training={"max_steps": 0}, metrics={})
    record.write(Path(out_dir), rec)
    return rec.to_dict()


def logits(model, ids_list) -> list:
    """Teacher-forced float32 logits of a torch causal LM for each id sequence."""
    import torch

    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in ids_list]


def sample_ids(tokenizer_dir: Path) -> list[list[int]]:
    """A few fixed sequences (chat-formatted and plain) in the tiny models' 512-token vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Two sequences keep the 4-bit reference cheap (each bnb forward costs ~0.3 s even on tiny models).
    chats = "".join(tok.apply_chat_template(e["messages"], tokenize=False) for e in EVAL_EXAMPLES)
    plain = ('The model merge export token layer quantized float check drift report. Number 42. '
             '{"name": "llama", "city": "Tokyo", "age": 7}')
    return [list(tok(t)["input_ids"]) for t in (chats, plain)]
