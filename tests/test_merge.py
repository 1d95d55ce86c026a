"""`lorax merge` on tiny models: the merged weights reproduce the trained model (the PEFT model on the
base as quantized in training) to max |Δlogit| <= 1e-4 in float32, and differ from the base."""

from __future__ import annotations

import json

import pytest
import torch
from adapters import LoraSpec, logits, make_adapter, sample_ids
from safetensors.torch import load_file

from exporter.gate.metrics import compare
from exporter.merge.api import MergeOptions, merge_adapter
from exporter.merge.plan import fold, lora_scale

EXACT = 1e-4  # float32 logit tolerance: dequantize + fold reproduces the trained model up to rounding


def load_merged(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def ids(tiny_model_dir):
    return sample_ids(tiny_model_dir)


@pytest.fixture(scope="module")
def base_logits(tiny_model_dir, ids):
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory, ids):
    """adapter(trained_on, double_quant, use_rslora) -> (adapter dir, reference logits), built once per module."""
    cache = {}

    def get(trained_on="nf4", double_quant=False, use_rslora=False):
        key = (trained_on, double_quant, use_rslora)
        if key not in cache:
            d = tmp_path_factory.mktemp("adapter") / "-".join(map(str, key))
            cache[key] = d, logits(make_adapter(tiny_model_dir, d, trained_on, double_quant, spec=LoraSpec(use_rslora=use_rslora)), ids)
        return cache[key]

    return get


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("trained_on,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("none", False)],
                         ids=["nf4", "nf4-dq", "fp4", "noquant"])
def test_merge_matches_trained_model(adapter, tmp_path, ids, base_logits, trained_on, double_quant, use_rslora):
    ad, ref = adapter(trained_on, double_quant, use_rslora)
    merged = logits(load_merged(merge_adapter(ad, tmp_path / "merged", MergeOptions(progress=False))), ids)
    exact = compare(ref, merged, ids)
    assert exact.max_abs_logit <= EXACT, exact
    assert compare(base_logits, merged, ids).max_abs_logit > 0.5  # the adapter really changed the model
    if trained_on != "none" and not use_rslora:
        # The naive merge into the stored weights is measurably not the trained model: proves the check bites.
        naive = logits(load_merged(merge_adapter(ad, tmp_path / "naive", MergeOptions(merge_base="original", progress=False))), ids)
        worse = compare(ref, naive, ids)
        assert worse.max_abs_logit > 1000 * max(exact.max_abs_logit, 1e-6) and worse.kld_mean > 1e-3, worse


def test_reference_rebuilds_the_trained_model(adapter, ids):
    from exporter.gate.reference import load_reference, read_adapter

    ad, trained = adapter("nf4", True)
    model, tokenizer = load_reference(read_adapter(ad))
    rebuilt = logits(model, ids)
    assert all(torch.equal(torch.from_numpy(a), torch.from_numpy(b)) for a, b in zip(trained, rebuilt, strict=True))
    assert tokenizer.chat_template


def test_embeddings_lm_head_and_modules_to_save(tiny_model_dir, tmp_path, ids):
    ref = logits(make_adapter(tiny_model_dir, tmp_path / "ad", "nf4", True, spec=LoraSpec(target_modules=[
        "q_proj", "down_proj", "embed_tokens"], extra={'modules_to_save': ["lm_head"]})), ids)
    out = merge_adapter(tmp_path / "ad", tmp_path / "merged", MergeOptions(progress=False))
    assert compare(ref, logits(load_merged(out), ids), ids).max_abs_logit <= EXACT
    counts = json.loads((out / "lorax.json").read_text())["merge"]["counts"]
    assert counts["lora_modules"] == 2 * 2 + 1 and counts["replaced"] >= 1  # 2 layers x 2 + embeddings


def test_lora_bias_on_qwen2_biases(tiny_model_factory, tmp_path):
    base = tiny_model_factory(arch="qwen2")  # q/k/v projections carry biases
    ids = sample_ids(base)
    ref = logits(make_adapter(base, tmp_path / "ad", "nf4", spec=LoraSpec(target_modules=["q_proj", "k_proj", "v_proj"], extra={'lora_bias': True})), ids)
    merged = load_merged(merge_adapter(tmp_path / "ad", tmp_path / "merged", MergeOptions(progress=False)))
    assert compare(ref, logits(merged, ids), ids).max_abs_logit <= EXACT


def test_tied_embeddings_are_untied_when_the_adapter_changes_one_side(tiny_model_factory, tmp_path):
    base = tiny_model_factory(tie_word_embeddings=True)
    ids = sample_ids(base)
    ref = logits(make_adapter(base, tmp_path / "ad", "nf4", spec=LoraSpec(target_modules=["embed_tokens", "q_proj"])), ids)
    out = merge_adapter(tmp_path / "ad", tmp_path / "merged", MergeOptions(progress=False))
    assert compare(ref, logits(load_merged(out), ids), ids).max_abs_logit <= EXACT
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    weights = load_file(out / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    # An adapter that leaves both embeddings alone keeps them tied (no lm_head tensor written).
    make_adapter(base, tmp_path / "ad2", "nf4", spec=LoraSpec(target_modules=["q_proj"]))
    out2 = merge_adapter(tmp_path / "ad2", tmp_path / "merged2", MergeOptions(progress=False))
    assert "lm_head.weight" not in load_file(out2 / "model.safetensors")
    assert json.loads((out2 / "config.json").read_text())["tie_word_embeddings"] is True


def test_row_chunks_and_shards_give_identical_weights(adapter, tmp_path, monkeypatch):
    ad, _ = adapter("nf4", True)
    whole = load_file(merge_adapter(ad, tmp_path / "whole", MergeOptions(progress=False)) / "model.safetensors")
    monkeypatch.setattr("exporter.merge.io.CHUNK_ELEMS", 1000)  # several row chunks per tensor, incl. 4-bit ones
    out = merge_adapter(ad, tmp_path / "sharded", MergeOptions(max_shard_bytes=100_000, progress=False))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    streamed = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert streamed.keys() == whole.keys() == index["weight_map"].keys()
    # The 4-bit round trip is bit-exact per chunk (test_quant4); the rank-r GEMM of a row block may round
    # its last bit differently from the whole matrix's, so the fold is compared to within 1e-6.
    for k in whole:
        torch.testing.assert_close(streamed[k], whole[k], rtol=0, atol=1e-6)


def test_output_dtype_and_merged_dir_contents(adapter, tmp_path):
    from lorax_common.hashing import sha256_file

    ad, _ = adapter("nf4")
    f32 = load_file(merge_adapter(ad, tmp_path / "f32", MergeOptions(progress=False)) / "model.safetensors")
    out = merge_adapter(ad, tmp_path / "bf16", MergeOptions(dtype="bfloat16", progress=False))
    bf16 = load_file(out / "model.safetensors")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].to(torch.bfloat16)) for k in f32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg and cfg["rope_theta"] == 10000.0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).exists(), name
    record = json.loads((out / "lorax.json").read_text())
    assert record["kind"] == "merged" and record["merge"]["merge_base"] == "quantized"
    assert record["trained_on"]["quant_type"] == "nf4" and record["merge"]["dtype"] == "bfloat16"
    on_disk = {p.name for p in out.iterdir()} - {"lorax.json"}
    assert set(record["files"]) == on_disk
    assert all(record["files"][n] == sha256_file(out / n) for n in on_disk)


def test_auto_builds_both_and_keeps_the_closer(adapter, tmp_path):
    ad, _ = adapter("nf4", True)
    out = merge_adapter(ad, tmp_path / "auto", MergeOptions(merge_base="auto", progress=False))
    merge = json.loads((out / "lorax.json").read_text())["merge"]
    q, o = merge["candidates"]["quantized"], merge["candidates"]["original"]
    assert merge["merge_base"] == "quantized" and q["kld_mean"] < 1e-9 < 1e-3 < o["kld_mean"]
    assert q["max_abs_logit"] <= EXACT and q["top1"] == 1.0 > o["top1"]
    assert not list(out.glob(".candidate-*"))
    direct = merge_adapter(ad, tmp_path / "direct", MergeOptions(progress=False))
    assert sha(out / "model.safetensors") == sha(direct / "model.safetensors")


def sha(path):
    from lorax_common.hashing import sha256_file

    return sha256_file(path)


def test_plain_peft_adapter_with_trained_on(adapter, tmp_path, ids):
    import shutil

    src, ref = adapter("fp4")
    ad = shutil.copytree(src, tmp_path / "plain")
    (ad / "lorax.json").unlink()  # a plain PEFT dir: training quantization unknown unless told
    out = merge_adapter(ad, tmp_path / "m", MergeOptions(trained_on="fp4", progress=False))
    assert compare(ref, logits(load_merged(out), ids), ids).max_abs_logit <= EXACT
    # Telling it the wrong training quantization is not exact: --trained-on matters.
    wrong = merge_adapter(ad, tmp_path / "w", MergeOptions(trained_on="nf4", progress=False))
    assert compare(ref, logits(load_merged(wrong), ids), ids).max_abs_logit > 0.01


def test_fold_is_the_lora_update():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g)
    torch.testing.assert_close(fold(w.clone(), a, b, 0.5), w + 0.5 * b @ a, rtol=0, atol=1e-6)
    # transposed (embeddings, fan_in_fan_out): w is [in, out] and gets (B @ A)^T; row chunks slice A's columns
    wt = w.t().contiguous()
    torch.testing.assert_close(fold(wt.clone(), a, b, 2.0, transpose=True), wt + 2.0 * (b @ a).t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(fold(wt[1:3].clone(), a[:, 1:3], b, 2.0, transpose=True), (wt + 2.0 * (b @ a).t())[1:3],
                               rtol=0, atol=1e-6)
    assert lora_scale(32, 16, False) == 2.0 and lora_scale(32, 16, True) == 8.0
