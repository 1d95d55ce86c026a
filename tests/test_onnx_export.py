"""ONNX export (formats/onnx) on tiny random models: parity with HF, the KV cache, batching, layout.

One float32 export per architecture, shared by every test in this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.gate.metrics import compare, max_abs_logit
from formats.archs import SUPPORTED
from formats.errors import FormatError

# every supported arch (formats/archs.py), with Llama 3.2's variant (tied, llama3 rope) beside plain llama
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "llama3.2", "smollm3", "phi3", "gemma3")
# qwen2 gets a real Qwen2 rope theta, so the legacy `rope_theta` key is checked with a value that a
# reader falling back to 10000 would get wrong.
MODEL_KW = {"qwen2": {"rope_theta": 1e6}}

PROMPTS = [
    "The model merge export token layer quantized float check drift report.",
    '{"name": "Paris", "city": "Tokyo", "age": 42}',
    "<|im_start|>user\nWhat color is the train loss?<|im_end|>\n<|im_start|>assistant\n",
    "def f10(x):\n    return x * 10 + 1\n",
]

F32_MAX_ABS_LOGIT = 1e-3
F32_KLD_MEAN = 1e-5
GEN_TOKENS = 32


# mistral gets a 4-token sliding window (Mistral-7B-v0.1 has 4096): every prompt and generation
# below runs past it, so the export's full cache + sliding mask is checked against HF's own.
SLIDING_WINDOW = {"mistral": 4}


@pytest.fixture(scope="module")
def hf_dirs(tiny_model_factory, tmp_path_factory) -> dict[str, Path]:
    import shutil

    dirs = {a: tiny_model_factory(arch=a, **MODEL_KW.get(a, {})) for a in ARCHS}
    for arch, window in SLIDING_WINDOW.items():
        dest = tmp_path_factory.mktemp("sliding") / arch
        shutil.copytree(dirs[arch], dest)
        cfg = json.loads((dest / "config.json").read_text())
        cfg["sliding_window"] = window
        (dest / "config.json").write_text(json.dumps(cfg, indent=2))
        dirs[arch] = dest
    return dirs


@pytest.fixture(scope="module")
def onnx_dirs(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    from formats.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return {a: export_onnx(d, root / a / "onnx").dir for a, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def runners(hf_dirs, onnx_dirs):
    from formats.hf.runner import HFRunner
    from formats.onnx.runner import ONNXRunner

    return {a: (HFRunner(hf_dirs[a]), ONNXRunner(onnx_dirs[a])) for a in ARCHS}


def _ids(hf) -> list[list[int]]:
    return [hf.tokenize(p) for p in PROMPTS]


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_logits_match_hf(runners, arch):
    hf, ox = runners[arch]
    ids = _ids(hf)
    parity = compare([hf.logits(i) for i in ids], [ox.logits(i) for i in ids], ids)
    print(f"\n{arch}: onnx kld {parity.kld_mean:.3g} max|dlogit| {parity.max_abs_logit:.3g}")
    assert parity.positions > 60
    assert parity.max_abs_logit <= F32_MAX_ABS_LOGIT, parity
    assert parity.kld_mean <= F32_KLD_MEAN, parity
    assert parity.top1 == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_cache_equals_hf_and_recompute(runners, arch):
    hf, ox = runners[arch]
    lengths = []
    for ids in _ids(hf):
        cached = ox.generate(ids, GEN_TOKENS)
        assert cached == hf.generate(ids, GEN_TOKENS)
        assert cached == ox.generate(ids, GEN_TOKENS, use_cache=False)
        lengths.append(len(cached))
    # Most prompts must run the full 32 steps, or an early end-of-text would hide cache bugs.
    assert sorted(lengths)[len(lengths) // 2] == GEN_TOKENS, lengths


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_batch_of_one(runners, arch):
    hf, ox = runners[arch]
    rows = _ids(hf)
    assert len({len(r) for r in rows}) == len(rows)  # every row but the longest is padded
    for row, batched in zip(rows, ox.logits_batch(rows), strict=True):
        assert batched.shape == (len(row), ox.config["vocab_size"])
        assert max_abs_logit(ox.logits(row), batched) <= 1e-4
    assert ox.generate_batch(rows, 12) == [ox.generate(r, 12) for r in rows]


def test_graph_has_optimum_io_layout(onnx_dirs):
    import onnx

    from formats.onnx import layout

    model = onnx.load(str(onnx_dirs["qwen3"] / "onnx" / "model.onnx"), load_external_data=False)
    cfg = json.loads((onnx_dirs["qwen3"] / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    assert list(ins) == ["input_ids", "attention_mask", "position_ids"] + layout.past_names(n)
    assert list(outs) == ["logits"] + layout.present_names(n)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert dims(ins["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(ins["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert dims(ins["past_key_values.1.value"]) == ["batch_size", cfg["num_key_value_heads"],
                                                    "past_sequence_length", cfg["head_dim"]]
    assert dims(outs["logits"]) == ["batch_size", "sequence_length", cfg["vocab_size"]]
    assert ins["past_key_values.0.key"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # qwen3 gets the GroupQueryAttention graph (formats/onnx/gqa.py): onnxruntime's contrib ops, which every
    # client lorax targets runs (they are all onnxruntime inside); a traced arch keeps standard ONNX ops only.
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    assert {op for d, op in ops if d == "com.microsoft"} <= {"GroupQueryAttention", "RotaryEmbedding",
                                                           "SkipSimplifiedLayerNormalization"}, ops
    traced = onnx.load(str(onnx_dirs["phi3"] / "onnx" / "model.onnx"), load_external_data=False)
    assert {o.domain for o in traced.opset_import} <= {"", "ai.onnx"}


# (arch, batch, past, new): a traced graph takes any shape; onnxruntime's GroupQueryAttention (the llama
# graph) refuses several new tokens per row on a non-empty cache in a batch ("batch_size must be 1 when
# sequence_length > 1 and past context is given"), which no client's prefill-then-one-token loop does.
DYNAMIC_SHAPES = [("phi3", 3, 5, 2), ("llama", 1, 5, 2), ("llama", 3, 5, 1)]


@pytest.mark.parametrize(("arch", "batch", "past", "new"), DYNAMIC_SHAPES)
def test_dynamic_batch_sequence_and_past(runners, arch, batch, past, new):
    hf, ox = runners[arch]
    g = ox.geom
    rng = np.random.default_rng(0)
    ids = rng.integers(3, ox.config["vocab_size"], (batch, past + new))
    _, cache = ox._forward(ids[:, :past], np.ones((batch, past), np.int64), ox._empty_cache(batch))
    logits, cache = ox._forward(ids[:, past:], np.ones((batch, past + new), np.int64), cache)
    assert logits.shape == (batch, new, ox.config["vocab_size"])
    assert [c.shape() for c in cache] == [[batch, g.kv_heads, past + new, g.head_dim]] * (2 * g.layers)
    for b in range(batch):
        assert max_abs_logit(hf.logits(ids[b].tolist())[past:], logits[b]) <= F32_MAX_ABS_LOGIT


def test_side_files_read_in_transformers_4(onnx_dirs, hf_dirs):
    d = onnx_dirs["qwen2"]
    cfg = json.loads((d / "config.json").read_text())
    # transformers 4.x reads rope_theta (it ignores rope_parameters and would use 10000).
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 1e6
    assert cfg["use_cache"] is True and cfg["model_type"] == "qwen2"
    tok = json.loads((d / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (d / "chat_template.jinja").read_text() == (hf_dirs["qwen2"] / "chat_template.jinja").read_text()
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]
    meta = json.loads((d / "lorax.json").read_text())
    assert (meta["kind"], meta["dtype"], meta["quant"]) == ("onnx", "float32", None)
    assert meta["variants"] == {"float32": "onnx/model.onnx"}
    assert meta["graph"] == "gqa" and json.loads((onnx_dirs["phi3"] / "lorax.json").read_text())["graph"] == "traced"
    import onnx

    graph = onnx.load(str(d / "onnx" / "model.onnx"), load_external_data=False)
    assert meta["opset"] == next(o.version for o in graph.opset_import if o.domain == "") >= 17


def test_files_are_clean_and_provenance_is_true(onnx_dirs, hf_dirs):
    """transformers.js reads the template from tokenizer_config.json only; nothing tells a reader how
    lorax loaded its inputs; the recorded source is the dir as given, with digests of its files."""
    from formats.hf.compat import DROP_CONFIG_KEYS, DROP_TOKENIZER_KEYS
    from lorax_common.hashing import sha256_file

    d, src = onnx_dirs["qwen2"], hf_dirs["qwen2"]
    tok = json.loads((d / "tokenizer_config.json").read_text())
    assert tok["chat_template"] == (d / "chat_template.jinja").read_text()
    assert not set(tok) & set(DROP_TOKENIZER_KEYS), tok.keys()
    assert not set(json.loads((d / "config.json").read_text())) & set(DROP_CONFIG_KEYS)
    source = json.loads((d / "lorax.json").read_text())["source"]
    assert Path(source["path"]).resolve() == src.resolve()
    assert source["sha256"]["model.safetensors"] == sha256_file(src / "model.safetensors")


def test_patch_dir_drops_load_time_keys(tmp_path):
    """What `AutoTokenizer.from_pretrained(...).save_pretrained(...)` leaves in a dir, cleaned."""
    from formats.hf.compat import patch_dir

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"is_local": True, "local_files_only": True, "name_or_path": "/tmp/x", "eos_token": "<|im_end|>",
         "tokenizer_class": "TokenizersBackend"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"},
                                                      "_name_or_path": "/tmp/x"}))
    patch_dir(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "{{ messages }}"}
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}


def test_genai_config_matches_the_model_and_graph(onnx_dirs):
    d = onnx_dirs["qwen3"]
    cfg, genai = (json.loads((d / n).read_text()) for n in ("config.json", "genai_config.json"))
    dec = genai["model"]["decoder"]
    assert dec["filename"] == "onnx/model.onnx" and (d / dec["filename"]).is_file()
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (
        cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"])
    assert genai["model"]["eos_token_id"] == [cfg["eos_token_id"]]
    # The graph concatenates its cache (present is longer than past): genai must not share one buffer.
    assert genai["search"]["past_present_share_buffer"] is False
    assert genai["search"]["do_sample"] is False and genai["search"]["max_length"] == cfg["max_position_embeddings"]


def test_sliding_window_is_in_effect(runners, tiny_model_factory):
    """The mistral model above really slides: without the window its logits differ."""
    from formats.hf.runner import HFRunner

    hf, ox = runners["mistral"]
    assert hf.model.config.sliding_window == SLIDING_WINDOW["mistral"]
    ids = _ids(hf)[0]
    assert len(ids) > 2 * SLIDING_WINDOW["mistral"]
    full = HFRunner(tiny_model_factory(arch="mistral")).logits(ids)
    assert max_abs_logit(full, ox.logits(ids)) > 0.1


def test_runner_tokenizer_matches_hf(runners):
    hf, ox = runners["mistral"]
    for p in PROMPTS:
        assert ox.tokenize(p) == hf.tokenize(p)
    assert ox.stop == hf.stop


# ---- the checks above can fail -------------------------------------------------------------


def test_parity_check_fails_against_a_different_model(runners, tiny_model_factory):
    """The ONNX of one model against another model's logits (same arch, other seed) fails the f32 limits."""
    from formats.hf.runner import HFRunner

    _, ox = runners["llama"]
    other = HFRunner(tiny_model_factory(arch="llama", seed=1))
    ids = _ids(other)
    parity = compare([other.logits(i) for i in ids], [ox.logits(i) for i in ids], ids)
    assert parity.max_abs_logit > 100 * F32_MAX_ABS_LOGIT
    assert parity.kld_mean > 1e4 * F32_KLD_MEAN


def test_broken_cache_is_caught(runners, monkeypatch):
    """A decode step that loses the cache (zeros instead of present) changes the greedy tokens."""
    hf, ox = runners["llama"]
    ids = _ids(hf)[0]
    honest = ox.generate(ids, GEN_TOKENS)
    real_forward = type(ox)._forward

    def zeroed_cache(self, ids_, mask, cache):
        import onnxruntime as ort

        logits, present = real_forward(self, ids_, mask, cache)
        return logits, [ort.OrtValue.ortvalue_from_numpy(np.zeros(p.shape(), np.float32)) for p in present]

    monkeypatch.setattr(type(ox), "_forward", zeroed_cache)
    broken = ox.generate(ids, GEN_TOKENS)
    assert broken != honest
    assert broken != ox.generate(ids, GEN_TOKENS, use_cache=False)  # the recompute still matches HF
    assert ox.generate(ids, GEN_TOKENS, use_cache=False) == honest


def test_ignored_padding_mask_is_caught(runners, monkeypatch):
    """A batch whose mask lets rows attend to their padding makes padded rows differ from batch 1.

    (Position ids counted from the left edge would not be caught, and need not be: RoPE scores
    depend on position differences only, so a constant shift leaves the logits unchanged.)
    """
    hf, ox = runners["llama"]
    rows = _ids(hf)
    real_pad = type(ox)._left_pad

    def unmasked(self, rows_):
        ids, mask = real_pad(self, rows_)
        return ids, np.ones_like(mask)

    monkeypatch.setattr(type(ox), "_left_pad", unmasked)
    diffs = [max_abs_logit(ox.logits(r), b) for r, b in zip(rows, ox.logits_batch(rows), strict=True)]
    longest = int(np.argmax([len(r) for r in rows]))
    assert diffs[longest] <= 1e-4  # the unpadded row is unaffected
    assert all(d > 1e-2 for i, d in enumerate(diffs) if i != longest), diffs


# ---- bad input ------------------------------------------------------------------------------


def test_unsupported_arch_is_one_clear_error(tmp_path):
    from formats.onnx.export import export_onnx

    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(FormatError) as err:
        export_onnx(src, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and "'gpt2'" in msg and f"supported: {', '.join(SUPPORTED)}" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"dtype": "bfloat16"}, "unknown ONNX dtype 'bfloat16'"),
    ({"quant": "int2"}, "unknown ONNX quantization 'int2'"),
    ({"dtype": "float16", "quant": "int8"}, "drop --onnx-dtype float16"),
])
def test_bad_options_are_refused_before_work(hf_dirs, tmp_path, kwargs, needle):
    from formats.onnx.export import export_onnx

    with pytest.raises(FormatError, match=needle):
        export_onnx(hf_dirs["llama"], tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(hf_dirs, tmp_path):
    from formats.onnx.export import export_onnx

    out = tmp_path / "onnx"
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    with pytest.raises(FormatError, match="--force"):
        export_onnx(hf_dirs["llama"], out)
    assert (out / "mine.txt").read_text() == "user file"


@pytest.mark.parametrize(("arch", "module", "writer"), [("phi3", "formats.onnx.decoder", "trace_decoder"),
                                                       ("llama", "formats.onnx.gqa", "run_builder")])
def test_failed_export_leaves_nothing(hf_dirs, tmp_path, monkeypatch, arch, module, writer):
    import importlib

    from formats.onnx.export import export_onnx

    def boom(hf_dir, dest, **kw):
        dest.mkdir(parents=True, exist_ok=True) if writer == "run_builder" else dest.parent.mkdir(parents=True)
        (dest / "model.onnx" if writer == "run_builder" else dest).write_bytes(b"half a graph")
        raise RuntimeError("writer failed")

    monkeypatch.setattr(importlib.import_module(module), writer, boom)
    with pytest.raises(RuntimeError, match="writer failed"):
        export_onnx(hf_dirs[arch], tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


def test_runner_rejects_a_dir_without_a_decoder(tmp_path):
    from formats.onnx.runner import ONNXRunner

    with pytest.raises(FormatError, match="no ONNX graph"):
        ONNXRunner(tmp_path)


def test_provider_choice():
    from formats.onnx.runner import pick_providers

    assert pick_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert pick_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
