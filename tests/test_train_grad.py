"""QLoRA gradients reach every layer, also after an eval pass (Trainer's eval_on_start).

bitsandbytes 0.50 repacks a Linear4bit for a kernel with no autograd formula (and bf16 absmax) the first time
it runs in eval mode on a CPU with AVX512-BF16; a later backward then silently drops the gradient through
every frozen base matmul. train.model.load_base pins the differentiable layout. The check is exact on any
CPU: LoRA gradients of the 4-bit model equal those of the same model with its 4-bit weights dequantized
into plain float Linear layers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from train.config import TrainConfig
from train.model import load_base, wrap_lora


def _dequantized_copy(peft_model):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    twin = copy.deepcopy(peft_model)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = F.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                plain = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                plain.weight = torch.nn.Parameter(w, requires_grad=False)
                if child.bias is not None:
                    plain.bias = torch.nn.Parameter(child.bias.detach().float(), requires_grad=False)
                setattr(module, child_name, plain)
    return twin


def _lora_grads(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("double_quant", [False, True])
def test_grads_after_eval_equal_dequantized_model(tiny_model_dir, double_quant):
    import bitsandbytes as bnb

    cfg = TrainConfig(base=str(tiny_model_dir), quant="nf4", double_quant=double_quant, dropout=0.0, rank=8)
    torch.manual_seed(0)
    model = wrap_lora(cfg, load_base(cfg, tiny_model_dir))
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    twin = _dequantized_copy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))

    model.eval()  # what eval_on_start does before the first training step
    with torch.no_grad():
        model(input_ids=ids)
    got, want = _lora_grads(model, ids), _lora_grads(twin, ids)

    assert got.keys() == want.keys() and len(got) > 0
    # LoRA B starts at zero, so only B receives gradient at step 0; the lowest layer's B gradient has passed
    # back through every 4-bit matmul above it
    first = sorted(k for k in got if "layers.0." in k and "lora_B" in k)
    assert first and all(got[k].abs().max() > 0 for k in first)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=f"gradient of {k}")
