"""`lorax train` (QLoRA: NF4, double quant) on tiny Phi-3 and Gemma 3, then `lorax merge`: the merged model is
the trained PEFT model within the f32 limits.

Phi-3's LoRA targets are its fused module names (qkv_proj, gate_up_proj: one Linear each); Gemma 3 carries its
SentencePiece tokenizer and chat template (tests/tiny_gemma.py), whose turns are what training masks and renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_run import eval_ids, logits
from tiny_data import chat_records, write_jsonl
from tiny_gemma import build_gemma3_spm_model

from exporter.cli.main import main
from exporter.gate.metrics import compare
from train.config import TrainConfig
from train.run import train

EXACT = 1e-4  # max |Δlogit| of an exact merge (tests/test_merge.py)
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "gemma3-spm": "all-linear"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base_for(name: str, factory, root: Path) -> Path:
    return build_gemma3_spm_model(root / "tiny-g3") if name == "gemma3-spm" else factory(arch=name)


@pytest.mark.parametrize("name", list(TARGETS))
def test_qlora_train_then_merge_is_exact(name, tiny_model_factory, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = base_for(name, tiny_model_factory, tmp_path)
    data = write_jsonl(chat_records(48), tmp_path / "chat.jsonl")
    out = tmp_path / "adapter"
    res = train(TrainConfig(base=str(base), data=str(data), out=str(out), max_seq_len=96, rank=8, alpha=16,
                            lr=5e-3, batch_size=4, logging_steps=5, save_steps=100, max_steps=20,
                            target_modules=TARGETS[name]))
    m = res.record["metrics"]
    print(f"\n{name}: eval loss {m['eval_loss_before']:.3f} -> {m['eval_loss']:.3f}")
    assert m["eval_loss"] < 0.8 * m["eval_loss_before"], m
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in f.keys()}
    if name == "phi3":
        assert adapted == set(TARGETS["phi3"]), adapted

    merged = tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged)]) == 0
    ids = eval_ids(out, res.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    trained = logits(res.model.eval(), ids)
    exact = compare(trained, logits(model, ids), ids)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    moved = compare(trained, logits(plain, ids), ids)
    print(f"{name}: merged vs trained PEFT max|dlogit| {exact.max_abs_logit:.3g}; base vs trained kld "
          f"{moved.kld_mean:.3g}")
    assert exact.max_abs_logit <= EXACT and exact.top1 == 1.0, exact
    assert moved.kld_mean > 0.05  # training moved the model, so the merge had something to carry

    # and the whole chain as a user runs it: the trained adapter dir to a gated f32 GGUF
    dist = tmp_path / "dist"
    rc = main(["export", str(out), "--out", str(dist), "--gguf", "--quant", "f32", "--gen-tokens", "4"])
    report = json.loads((dist / "report.json").read_text())
    gguf = next(t for t in report["targets"] if t["name"] == "model-f32.gguf")
    print(f"{name}: lorax export GGUF f32 vs trained kld {gguf['metrics']['kld_mean']:.3g}")
    assert rc == 0 and gguf["passed"], gguf
    assert (dist / "merged" / "tokenizer.model").is_file() == (base / "tokenizer.model").is_file()
