"""The architectures of issue 15 (Llama 3.2, SmolLM3, Phi-3/4-mini, Gemma 3) through GGUF and the merge, on
tiny random models; the one list of supported archs (formats/archs.py) and the refusal of the others.

GGUF f32 vs HF in llama.cpp: mean KLD <= 1e-4 and top-1 >= 0.99 on 512 tokens; tokenizer ids equal on the
conformance probe set (inline special tokens and chat-template renders included); a random QLoRA adapter on
NF4 merges to max |Δlogit| <= 1e-4 against its PEFT reference. ONNX parity is in test_onnx_export.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf_helpers import parity
from tiny_models import ARCHS as TINY_ARCHS
from tiny_models import build_tiny_model

from formats import archs
from formats.errors import FormatError
from formats.gguf import arch
from formats.onnx import layout

NEW = ("llama3.2", "smollm3", "phi3", "gemma3")
KLD_F32, TOP1_F32, EXACT = 1e-4, 0.99, 1e-4
README = Path(__file__).resolve().parents[1] / "README.md"


def model_type_of(name: str) -> str:
    import transformers

    return getattr(transformers, TINY_ARCHS[name][0]).model_type


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    # llama.cpp keys a Phi-3 vocab rule on general.name; the writer guards it (tests/test_gguf_names.py)
    root = tmp_path_factory.mktemp("archs")
    return {a: build_tiny_model(root / f"tiny-{i}", arch=a) for i, a in enumerate(NEW)}


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory) -> dict[str, Path]:
    from formats.gguf.writer import write_gguf

    root = tmp_path_factory.mktemp("archs-gguf")
    return {a: write_gguf(d, root / f"{a}.gguf", "f32", progress=False) for a, d in models.items()}


# ------------------------------------------------------------------------------------ the one list


def test_every_format_and_the_fixtures_cover_exactly_the_supported_list():
    assert list(arch.ARCHS) == list(archs.SUPPORTED)
    assert list(layout.SUPPORTED_ARCHS) == list(archs.SUPPORTED)
    assert {t: arch.ARCHS[t].name for t in archs.SUPPORTED} == {t: a.gguf_arch for t, a in archs.SUPPORTED.items()}
    assert {model_type_of(n) for n in TINY_ARCHS} == set(archs.SUPPORTED)  # a tiny model for every arch


def test_readme_table_lists_every_supported_arch():
    rows = re.findall(r"^\| `([\w.]+)` \|", README.read_text(), re.M)
    assert rows == list(archs.SUPPORTED)


def test_unsupported_arch_is_refused_before_any_work(tmp_path, capsys):
    from exporter.cli.main import main

    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    rc = main(["export", str(model), "--out", str(tmp_path / "dist"), "--gguf", "--onnx"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.endswith(f"model_type 'gpt2'; supported: {', '.join(archs.SUPPORTED)}"), err
    assert not (tmp_path / "dist").exists()


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("name", NEW)
def test_gguf_f32_matches_hf_in_llama_cpp(models, ggufs, name):
    p = parity(models[name], ggufs[name])
    print(f"\n{name}: kld {p.kld_mean:.3g} top1 {p.top1:.4f} max|dlogit| {p.max_abs_logit:.3g}")
    assert p.positions == 512
    assert p.kld_mean <= KLD_F32 and p.top1 >= TOP1_F32, p


@pytest.mark.parametrize("name", NEW)
def test_tokenizer_ids_equal_on_probes_with_specials_and_chat_template(models, ggufs, name):
    from formats.gguf.conformance import check_tokenizer, probe_texts
    from formats.gguf.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(models[name])
    probes = [t for t, _ in probe_texts(tok)]
    assert any("<|im_end|>" in t for t in probes) and any(t.startswith("<|im_start|>system") for t in probes)
    report = check_tokenizer(tok, ggufs[name])
    assert report.probes == len(probes) and report.warnings == []


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def test_layout_of_each_new_arch(models, ggufs):
    from safetensors.numpy import load_file

    # Gemma 3: every RMSNorm weight stored as (1 + w), since llama.cpp multiplies by the stored weight
    hf = load_file(models["gemma3"] / "model.safetensors")
    g = _tensors(ggufs["gemma3"])
    for hf_name, gguf_name in [("model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
                               ("model.layers.5.pre_feedforward_layernorm.weight", "blk.5.ffn_norm.weight"),
                               ("model.layers.1.self_attn.q_norm.weight", "blk.1.attn_q_norm.weight"),
                               ("model.norm.weight", "output_norm.weight")]:
        np.testing.assert_array_equal(g[gguf_name], hf[hf_name] + 1.0)
    assert "output.weight" not in g  # tied
    # Phi-3: fused projections kept fused; longrope factors as two tensors of rotary/2 values
    p = _tensors(ggufs["phi3"])
    assert p["blk.0.attn_qkv.weight"].shape == (64 + 2 * 32, 64) and p["blk.0.ffn_up.weight"].shape == (2 * 192, 64)
    np.testing.assert_allclose(p["rope_factors_short.weight"], [1.0 + 0.1 * i for i in range(6)], rtol=1e-6)
    # Llama 3.2: rope_freqs from the llama3 formula, no output tensor (tied)
    ll = _tensors(ggufs["llama3.2"])
    assert "output.weight" not in ll and ll["rope_freqs.weight"].max() == 32.0 and ll["rope_freqs.weight"].min() == 1.0


def test_gguf_metadata_of_each_new_arch(ggufs):
    def meta(name):
        r = GGUFReader(ggufs[name])
        return {k: f.contents() for k, f in r.fields.items() if not k.startswith(("tokenizer.", "GGUF."))}

    g = meta("gemma3")
    assert g["general.architecture"] == "gemma3" and g["gemma3.attention.sliding_window"] == 16
    assert g["gemma3.rope.freq_base"] == 1e6 and g["gemma3.rope.freq_base_swa"] == 1e4
    assert "gemma3.attention.sliding_window_pattern" not in g  # 5 sliding + 1 full: llama.cpp's default period
    p = meta("phi3")
    assert p["phi3.rope.dimension_count"] == 12 and p["phi3.rope.scaling.type"] == "longrope"
    assert p["phi3.rope.scaling.original_context_length"] == 1024 and p["phi3.attention.sliding_window"] == 0
    assert p["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(2) / np.log(1024)))
    s = meta("smollm3")
    assert s["general.architecture"] == "smollm3" and s["smollm3.block_count"] == 4


def test_configs_the_gguf_cannot_hold_are_refused():
    base = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "vocab_size": 10}
    cfg = {**base, "model_type": "smollm3", "no_rope_layers": [1, 0, 1, 0]}
    with pytest.raises(FormatError, match=r"no_rope_layers \[1, 0, 1, 0\] is not llama.cpp's fixed pattern"):
        arch.model_metadata(arch.arch_spec(cfg), arch.hparams(cfg), cfg)
    cfg = {**base, "model_type": "gemma3_text", "query_pre_attn_scalar": 256, "layer_types": []}
    with pytest.raises(FormatError, match=r"query_pre_attn_scalar=256, but llama.cpp scales attention by 1/sqrt\(16\)"):
        arch.model_metadata(arch.arch_spec(cfg), arch.hparams(cfg), cfg)


def test_gemma3_sliding_window_is_not_a_caveat_but_phi3s_is():
    assert arch.caveats({"model_type": "gemma3_text", "sliding_window": 16, "max_position_embeddings": 2048}) == []
    assert arch.caveats({"model_type": "phi3", "sliding_window": 2047, "max_position_embeddings": 4096})


def test_pre_tokenizer_is_the_one_transformers_builds(tiny_model_factory, tmp_path):
    """A qwen2 model carrying SmolLM2's tokenizer.json: transformers 5 runs Qwen2's split regex, so must llama.cpp."""
    from formats.gguf.conformance import check_tokenizer
    from formats.gguf.tokenizer import load_hf_tokenizer, load_vocab
    from formats.gguf.writer import write_gguf

    model = tiny_model_factory(arch="qwen2")
    file_pre = json.loads((model / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [p["type"] for p in file_pre["pretokenizers"]] == ["Digits", "ByteLevel"]  # the file says smollm
    assert load_vocab(model, 512).pre == "qwen2"
    check_tokenizer(load_hf_tokenizer(model), write_gguf(model, tmp_path / "m.gguf", "f32", progress=False))


# --------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("name", NEW)
def test_qlora_adapter_merges_exactly(models, tmp_path, name):
    """all-linear LoRA (Phi-3's fused qkv_proj/gate_up_proj are single Linear layers) on NF4 + double quant."""
    import torch
    from adapters import logits, make_adapter, sample_ids
    from transformers import AutoModelForCausalLM

    from exporter.gate.metrics import compare
    from exporter.merge.api import MergeOptions, merge_adapter

    ids = sample_ids(models[name])
    ref = make_adapter(models[name], tmp_path / "ad", "nf4", double_quant=True)
    if name == "phi3":
        from safetensors import safe_open

        with safe_open(tmp_path / "ad" / "adapter_model.safetensors", "pt") as f:
            adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in f.keys()}
        assert {"qkv_proj", "gate_up_proj"} <= adapted, adapted
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(tmp_path / "ad", tmp_path / "m", MergeOptions(progress=False)),
                                                  dtype=torch.float32)
    exact = compare(logits(ref, ids), logits(merged, ids), ids)
    base = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
    print(f"\n{name}: merged vs PEFT max|dlogit| {exact.max_abs_logit:.3g}")
    assert exact.max_abs_logit <= EXACT, exact
    assert compare(logits(base, ids), logits(merged, ids), ids).max_abs_logit > 0.5  # the adapter changed it


def test_phi3_longrope_runs_within_its_original_context(models, ggufs, monkeypatch):
    """llama.cpp picks longrope's long factors by its context size, transformers by sequence length: the runner
    keeps every sequence's context within original_max_position_embeddings (1024 here), batched decoding too."""
    from gguf_helpers import reference

    from exporter.gate.metrics import compare
    from formats.gguf import runner
    from formats.gguf.runner import GGUFRunner

    cfg = json.loads((models["phi3"] / "config.json").read_text())
    assert any(c.startswith("longrope: llama.cpp uses the long rope factors") for c in arch.caveats(cfg))
    ids, hf = reference(models["phi3"])
    with GGUFRunner(ggufs["phi3"], n_ctx=4096) as r:
        assert r.n_ctx == 1024
        prompts = [ids[:600], ids[1:601]]  # 1200 cells in one shared cache would exceed 1024
        assert r.generate_batch(prompts, 8) == [r.generate(p, 8) for p in prompts]
    monkeypatch.setattr(runner, "longrope_context", lambda path: None)  # planted: the context left at 4096
    with GGUFRunner(ggufs["phi3"], n_ctx=4096, n_threads=1) as r:
        wide = compare([hf], [r.logits(ids)], [ids])
    print(f"\nphi3 with a 4096 context (long factors): kld {wide.kld_mean:.3g}")
    assert wide.kld_mean > 1e-2
