"""`lorax train` on the real SmolLM2-135M-Instruct (slow): QLoRA NF4 on CPU, exact reload, honest lorax.json.

Throughput against a plain PEFT + Trainer script is measured by scripts/bench_train.py, not here:
a tokens/s threshold in a test on a shared CPU would fail on noise.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_train_run import cfg_for, eval_ids, logits, reload_reference

from exporter.gate.metrics import compare, max_abs_logit
from train.run import train

pytestmark = pytest.mark.slow

TOPICS = ["rivers", "owls", "bread", "maps", "tides", "glass", "bees", "kites"]


def test_qlora_smollm2_reloads_exactly(smollm2_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {t}."},
                          {"role": "assistant", "content": f"{t.capitalize()} are interesting; fact {i}."}]}
            for i, t in enumerate(TOPICS * 2)]
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train(cfg_for(smollm2_dir, data_file, tmp_path / "adapter", max_steps=4, batch_size=2, rank=16, alpha=32,
                        lr=1e-3, max_seq_len=128, eval_fraction=0.25))
    rec = res.record
    assert rec["base"]["storage_dtype"] == "float32" and rec["base"]["architecture"] == "llama"
    assert rec["quantization"] == {"method": "bnb-4bit", "quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                   "compute_dtype": "float32", "quant_storage": "uint8",
                                   "unquantized_dtype": "float32", "load_dtype": "float32",
                                   "torch_threads": torch.get_num_threads()}
    # tied embeddings: all-linear adapts the projections, never the (tied) output head
    assert "lm_head" not in rec["lora"]["target_modules"] and "q_proj" in rec["lora"]["target_modules"]
    assert rec["metrics"]["eval_loss"] < rec["metrics"]["eval_loss_before"]

    ids = eval_ids(res.out, res.tokenizer)
    mem = logits(res.model.eval(), ids)
    ref = reload_reference(res.out)
    disk = logits(ref, ids)
    assert max(max_abs_logit(a, b) for a, b in zip(mem, disk, strict=True)) <= 1e-4
    with ref.disable_adapter(), torch.no_grad():
        plain = logits(ref, ids)
    assert compare(disk, plain, ids).kld_mean > 1e-4  # the adapter changed the model measurably
