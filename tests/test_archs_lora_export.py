"""`lorax export --gguf-adapter` on QLoRA adapters of the issue-15 archs: the LoRA GGUF over the base as trained,
run in llama.cpp, gated against the PEFT model as trained (NF4 base + adapter) at the f32 limits.

Phi-3's adapter sits on its fused qkv_proj / gate_up_proj; Gemma 3 carries its own SentencePiece tokenizer
(tests/tiny_gemma.py), which the adapter dir saves the way `lorax train` does (transformers 5 writes no
tokenizer.model there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adapters import LoraSpec, make_adapter
from tiny_gemma import build_gemma3_spm_model

from exporter.cli.main import main

PAIR = "base-as-trained-f32.gguf + model-lora-f32.gguf"


@pytest.fixture(scope="module")
def bases(tiny_model_factory, tmp_path_factory):
    def make(name: str) -> Path:
        if name == "gemma3-spm":
            return build_gemma3_spm_model(tmp_path_factory.mktemp("gemma3-spm") / "tiny-g3")
        return tiny_model_factory(arch=name)
    return make


@pytest.mark.parametrize("name", ["phi3", "gemma3-spm", "llama3.2", "smollm3"])
def test_lora_gguf_pair_is_gated_against_the_peft_model(bases, tmp_path, name):
    adapter = tmp_path / "adapter"
    make_adapter(bases(name), adapter, trained_on="nf4", double_quant=True, spec=LoraSpec(seed=3, r=4, alpha=8))
    out = tmp_path / "dist"
    rc = main(["export", str(adapter), "--out", str(out), "--gguf", "--quant", "f32", "--gguf-adapter",
               "--gen-tokens", "4"])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    by = {t["name"]: t for t in report.get("targets", [])}
    assert rc == 0, {k: t.get("failures") or t.get("error") for k, t in by.items()}
    pair, model = by[PAIR], by["model-f32.gguf"]
    print(f"\n{name}: LoRA pair vs PEFT kld {pair['metrics']['kld_mean']:.3g} top1 {pair['metrics']['top1']:.4f}; "
          f"merged GGUF kld {model['metrics']['kld_mean']:.3g}")
    assert pair["gated"] and pair["passed"] and pair["metrics"]["kld_mean"] <= 1e-4, pair
    assert pair["metrics"]["top1"] >= 0.99
    naive = by["original-base + model-lora-f32.gguf"]  # the same LoRA over the unquantized base: far off
    assert naive["metrics"]["kld_mean"] > 100 * pair["metrics"]["kld_mean"]
