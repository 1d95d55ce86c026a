"""`--gguf-adapter`: the LoRA alone as a llama.cpp LoRA GGUF, applied over the base GGUF at run time,
must give the logits of the merged GGUF (both f32). The merge is PEFT's merge_and_unload (no quantization).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from gguf import GGUFReader
from gguf_helpers import build_lora, gguf_logits, reference

from exporter.gate.metrics import compare
from formats.errors import FormatError
from formats.gguf import arch
from formats.gguf.adapter import gguf_alpha, write_lora_gguf
from formats.gguf.export import GGUFOptions, export_gguf
from formats.gguf.runner import GGUFRunner
from formats.gguf.writer import write_gguf

PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_case(tiny_model_factory, tmp_path_factory):
    """(base dir, adapter dir, merged dir, base f32 GGUF, merged f32 GGUF) for several adapters."""
    root = tmp_path_factory.mktemp("lora")
    cases = {}

    def make(name: str, arch_name: str = "llama", **lora_kw):
        if name not in cases:
            base = tiny_model_factory(arch=arch_name)
            adapter, merged = root / f"{name}-adapter", root / f"{name}-merged"
            build_lora(base, adapter, merged, **lora_kw)
            base_gguf = write_gguf(base, root / f"{name}-base.gguf", "f32", progress=False)
            merged_gguf = write_gguf(merged, root / f"{name}-merged.gguf", "f32", progress=False)
            cases[name] = (base, adapter, merged, base_gguf, merged_gguf)
        return cases[name]

    return make


def adapter_vs_merged(case, lora_gguf):
    base, adapter, merged, base_gguf, merged_gguf = case
    ids, hf_merged = reference(merged)
    merged_logits = gguf_logits(merged_gguf, ids)
    with_lora = gguf_logits(base_gguf, ids, lora_path=lora_gguf)
    return compare([merged_logits], [with_lora], [ids]), compare([hf_merged], [merged_logits], [ids])


@pytest.mark.parametrize(("name", "arch_name", "lora_kw"), [
    ("llama", "llama", {}),
    ("qwen2", "qwen2", {}),  # no q/k permutation, q/k/v biases in the base
    ("rslora", "llama", {"use_rslora": True, "r": 4, "lora_alpha": 8}),
    # the issue-15 archs: Phi-3's LoRA sits on the fused qkv_proj/gate_up_proj (attn_qkv, ffn_up in the GGUF)
    ("phi3", "phi3", {"target_modules": PHI3_TARGETS}),
    ("gemma3", "gemma3", {}),  # (1 + w) norms in the base, sliding-window layers
    ("llama3.2", "llama3.2", {}),  # tied embeddings, llama3 rope factors, q/k permuted
    ("smollm3", "smollm3", {}),  # q/k permuted, layers without rope
])
def test_adapter_over_base_matches_merged(lora_case, tmp_path, name, arch_name, lora_kw):
    case = lora_case(name, arch_name, **lora_kw)
    lora = write_lora_gguf(case[1], case[0], tmp_path / "lora.gguf", progress=False)
    vs_merged, merged_vs_hf = adapter_vs_merged(case, lora)
    print(f"\n{name}: base+LoRA vs merged GGUF kld {vs_merged.kld_mean:.2e} top1 {vs_merged.top1:.4f} "
          f"max|dlogit| {vs_merged.max_abs_logit:.3g}; merged GGUF vs HF kld {merged_vs_hf.kld_mean:.2e}")
    assert vs_merged.kld_mean <= 1e-4 and vs_merged.top1 >= 0.99
    assert merged_vs_hf.kld_mean <= 1e-4 and merged_vs_hf.top1 >= 0.99
    # and the adapter matters: the base alone is far from the merged model
    base_only = compare([gguf_logits(case[4], reference(case[2])[0])],
                        [gguf_logits(case[3], reference(case[2])[0])], [reference(case[2])[0]])
    assert base_only.kld_mean > 1e-2


def test_adapter_file_layout(lora_case, tmp_path):
    base, adapter, *_ = lora_case("llama")
    lora = write_lora_gguf(adapter, base, tmp_path / "lora.gguf", progress=False)
    r = GGUFReader(lora)
    fields = {k: f.contents() for k, f in r.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0 and fields["general.architecture"] == "llama"
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order: ne0 first
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8) and shapes["blk.0.attn_q.weight.lora_b"] == (8, 64)
    assert len(shapes) == 2 * 7 * 2  # A and B for 7 projections in 2 blocks


def test_unpermuted_lora_b_fails(lora_case, tmp_path, monkeypatch):
    case = lora_case("llama")
    monkeypatch.setitem(arch.ARCHS, "llama", dataclasses.replace(arch.ARCHS["llama"], permute_qk=False))
    lora = write_lora_gguf(case[1], case[0], tmp_path / "lora.gguf", progress=False)
    vs_merged, _ = adapter_vs_merged(case, lora)
    print(f"\nunpermuted lora_b: kld {vs_merged.kld_mean:.3g}")
    assert vs_merged.kld_mean > 1e-4


def test_wrong_alpha_fails(lora_case, tmp_path):
    case = lora_case("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(case[1], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 2
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    vs_merged, _ = adapter_vs_merged(case, write_lora_gguf(adapter, case[0], tmp_path / "lora.gguf",
                                                           progress=False))
    print(f"\nalpha doubled: kld {vs_merged.kld_mean:.3g}")
    assert vs_merged.kld_mean > 1e-2


@pytest.mark.parametrize(("edit", "message"), [
    ({"modules_to_save": ["lm_head"]}, "cannot carry modules_to_save"),
    ({"use_dora": True}, "cannot carry use_dora"),
    ({"rank_pattern": {"q_proj": 4}}, "cannot carry rank_pattern"),
])
def test_unsupported_adapters_are_refused(lora_case, tmp_path, edit, message):
    base, adapter_src, *_ = lora_case("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_src, adapter)
    cfg = {**json.loads((adapter / "adapter_config.json").read_text()), **edit}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=f"{message}.*export the merged model instead"):
        write_lora_gguf(adapter, base, tmp_path / "lora.gguf", progress=False)
    assert not (tmp_path / "lora.gguf").exists()


def test_rslora_alpha_conversion():
    assert gguf_alpha({"lora_alpha": 16, "r": 16}) == 16.0
    assert gguf_alpha({"lora_alpha": 16, "r": 16, "use_rslora": True}) == 64.0  # 16/sqrt(16) == 64/16


def test_export_writes_the_adapter_next_to_the_model(lora_case, tmp_path):
    base, adapter, merged, *_ = lora_case("llama")
    result = export_gguf(merged, tmp_path, ["f32"], GGUFOptions(adapter_dir=adapter, progress=False))
    assert [(f.path.name, f.kind) for f in result] == [("model-f32.gguf", "model"), ("model-lora-f32.gguf", "lora")]


def test_rejected_lora_is_an_error_not_a_silent_base(lora_case, tiny_model_factory, tmp_path):
    _, adapter, *_ = lora_case("llama")
    wide = tiny_model_factory(arch="llama", hidden_size=256, intermediate_size=512)
    lora = write_lora_gguf(adapter, lora_case("llama")[0], tmp_path / "lora.gguf", progress=False)
    other = write_gguf(wide, tmp_path / "wide.gguf", "f32", progress=False)
    with pytest.raises(FormatError, match="rejected the LoRA lora.gguf.*incorrect shape"):
        GGUFRunner(other, lora_path=lora)


def test_phi3_lora_is_on_the_fused_tensors(lora_case, tmp_path):
    base, adapter, *_ = lora_case("phi3", "phi3", target_modules=PHI3_TARGETS)
    r = GGUFReader(write_lora_gguf(adapter, base, tmp_path / "lora.gguf", progress=False))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order: ne0 first
    assert shapes["blk.0.attn_qkv.weight.lora_b"] == (8, 64 + 2 * 32)  # q rows, then k, then v
    assert shapes["blk.0.ffn_up.weight.lora_b"] == (8, 2 * 192)  # gate rows, then up
    assert len(shapes) == 2 * 4 * 2


def test_phi3_lora_with_gate_and_up_swapped_fails(lora_case, tmp_path):
    """The fused gate|up LoRA B with its halves swapped: the check must see it (llama.cpp splits gate first)."""
    import torch
    from safetensors.torch import load_file, save_file

    case = lora_case("phi3", "phi3", target_modules=PHI3_TARGETS)
    adapter = tmp_path / "adapter"
    shutil.copytree(case[1], adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    for key, w in weights.items():
        if "gate_up_proj.lora_B" in key:
            weights[key] = torch.cat(w.chunk(2, dim=0)[::-1]).contiguous()
    save_file(weights, adapter / "adapter_model.safetensors")
    vs_merged, _ = adapter_vs_merged(case, write_lora_gguf(adapter, case[0], tmp_path / "lora.gguf", progress=False))
    print(f"\nphi3 gate/up swapped: kld {vs_merged.kld_mean:.3g}")
    assert vs_merged.kld_mean > 1e-3
