"""Architecture tables and pure math of the GGUF writer (no llama.cpp, no model files)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import MODEL_TENSORS

from formats.archs import SUPPORTED
from formats.errors import FormatError
from formats.gguf import arch


@pytest.mark.parametrize("model_type", sorted(arch.ARCHS))
def test_every_table_entry_is_a_tensor_llama_cpp_knows_for_that_arch(model_type):
    spec = arch.ARCHS[model_type]
    allowed = set(MODEL_TENSORS[spec.arch])
    unknown = {hf: kind for hf, (kind, _) in spec.tensors.items() if kind not in allowed}
    assert unknown == {}, f"{model_type}: tensors llama.cpp does not load for {spec.name}: {unknown}"


def test_names_use_block_templates():
    spec = arch.ARCHS["qwen3"]
    assert arch.gguf_tensor_name(spec, "model.layers.17.self_attn.k_norm.weight")[0] == "blk.17.attn_k_norm.weight"
    assert arch.gguf_tensor_name(spec, "model.embed_tokens.weight")[0] == "token_embd.weight"
    assert arch.gguf_tensor_name(spec, "lm_head.weight")[0] == "output.weight"
    assert arch.gguf_tensor_name(spec, "model.layers.3.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(FormatError, match="no GGUF name"):
        arch.gguf_tensor_name(spec, "model.layers.0.mlp.experts.0.w1.weight")


def test_unsupported_arch_lists_supported():
    with pytest.raises(FormatError, match="the GGUF writer does not support model_type 'gpt2'; supported: "
                       + ", ".join(SUPPORTED)):
        arch.arch_spec({"model_type": "gpt2"})


def test_permutation_interleaves_rotate_half_pairs_per_head():
    n_head, head_dim = 2, 8
    rows = np.arange(n_head * head_dim)
    out = arch.permute_qk(rows, n_head)
    # HF pairs row i with i + head_dim/2; llama.cpp wants the pair adjacent: (0,4),(1,5),... per head
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, 5))
    assert np.array_equal(arch.unpermute_qk(arch.permute_qk(w, n_head), n_head), w)
    assert not np.array_equal(arch.permute_qk(w, n_head), w)


def test_llama3_rope_factors_match_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    base = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    factors = arch.llama3_rope_factors(rope, 64)
    # llama.cpp divides each base frequency by its factor; transformers stores the divided frequency
    np.testing.assert_allclose(base / factors, inv_freq.double().numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 32.0  # both ends of the ramp are exercised


def test_metadata_from_config_including_legacy_rope_keys():
    cfg = {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 96, "intermediate_size": 256,
           "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "vocab_size": 1000, "rope_theta": 50000.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    spec = arch.arch_spec(cfg)
    items, extra = arch.model_metadata(spec, arch.hparams(cfg))
    meta = {k: v for k, v, _ in items}
    assert meta["llama.attention.head_count"] == 6 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.attention.key_length"] == 16 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.rope.freq_base"] == 50000.0 and meta["llama.context_length"] == 4096
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0
    assert extra == {}


def test_unsupported_rope_scaling_is_refused():
    cfg = {"model_type": "qwen2", "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "vocab_size": 10,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    with pytest.raises(FormatError, match="rope scaling 'yarn' is not supported.*default, linear, llama3, longrope"):
        arch.model_metadata(arch.arch_spec(cfg), arch.hparams(cfg))


def test_sliding_window_is_reported_when_it_can_bite():
    assert arch.caveats({"sliding_window": 4096, "max_position_embeddings": 32768})[0].startswith(
        "sliding_window=4096: llama.cpp attends to the whole context")
    assert arch.caveats({"sliding_window": 4096, "max_position_embeddings": 4096}) == []
    assert arch.caveats({"sliding_window": 4096, "use_sliding_window": False, "max_position_embeddings": 32768}) == []
    assert arch.caveats({"sliding_window": None, "max_position_embeddings": 2048}) == []
