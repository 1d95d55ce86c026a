"""ONNX float16, int8 and int4 exports (formats/onnx) of a tiny random llama: size, quantized ops, parity.

The float32 export and its parity with HF, per architecture, are in tests/test_onnx_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_onnx_export import F32_MAX_ABS_LOGIT, PROMPTS

from exporter.gate.metrics import compare

F16_KLD_MEAN = 1e-3


@pytest.fixture(scope="module")
def hf_dirs(tiny_model_factory) -> dict[str, Path]:
    return {"llama": tiny_model_factory(arch="llama")}


@pytest.fixture(scope="module")
def onnx_dirs(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    from formats.onnx.export import export_onnx

    return {"llama": export_onnx(hf_dirs["llama"], tmp_path_factory.mktemp("onnx") / "llama" / "onnx").dir}


@pytest.fixture(scope="module")
def runners(hf_dirs, onnx_dirs):
    from formats.hf.runner import HFRunner
    from formats.onnx.runner import ONNXRunner

    return {"llama": (HFRunner(hf_dirs["llama"]), ONNXRunner(onnx_dirs["llama"]))}


def _ids(hf) -> list[list[int]]:
    return [hf.tokenize(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def quantized_dirs(hf_dirs, onnx_dirs, tmp_path_factory) -> dict[str, Path]:
    """int8 and int4 through export_onnx, reusing the float32 llama trace (tracing is tested above)."""
    import shutil

    import formats.onnx.decoder as decoder
    from formats.onnx.export import export_onnx

    def reuse_trace(hf_dir, dest, external_data=None, **kw):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(onnx_dirs["llama"] / "onnx" / "model.onnx", dest)

    root = tmp_path_factory.mktemp("quant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoder, "trace_decoder", reuse_trace)
        # int4 also writes its weights to model_q4.onnx.data, the path models past 2 GB take.
        return {q: export_onnx(hf_dirs["llama"], root / q, quant=q, external_data=(q == "int4")).dir
                for q in ("int8", "int4")}


def _weight_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def _op_types(path: Path) -> tuple[set[str], int]:
    """Op types in the graph, and how many float MatMuls multiply by a weight (an initializer)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    float_weight_matmuls = sum(n.op_type == "MatMul" and n.input[1] in weights for n in graph.node)
    return {n.op_type for n in graph.node}, float_weight_matmuls


def test_float16_export(hf_dirs, runners, tmp_path):
    from formats.onnx.export import export_onnx
    from formats.onnx.runner import ONNXRunner

    d = export_onnx(hf_dirs["llama"], tmp_path / "onnx", dtype="float16").dir
    ox16 = ONNXRunner(d)
    hf, ox32 = runners["llama"]
    assert ox16.cache_dtype == np.float16
    ids = _ids(hf)
    parity = compare([hf.logits(i) for i in ids], [ox16.logits(i) for i in ids], ids)
    assert 0 < parity.kld_mean <= F16_KLD_MEAN, parity  # > 0: the weights really are float16
    assert parity.max_abs_logit > F32_MAX_ABS_LOGIT
    assert _weight_bytes(d / "onnx" / "model_fp16.onnx") < 0.51 * _weight_bytes(ox32.dir / "onnx" / "model.onnx")
    assert not (d / "onnx" / "model.onnx").exists()
    assert ox16.generate(ids[0], 16) == ox16.generate(ids[0], 16, use_cache=False)
    assert json.loads((d / "lorax.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_exports(quantized_dirs, runners, tiny_model_factory, quant, record_property, capsys):
    """Recorded (size, tokens/s, KLD, top-1); asserted: smaller, every weight MatMul quantized, cache
    still exact, and far closer to the model than a different model is. Tiny random weights have no structure,
    so KLD here is much worse than on a real model (see the SmolLM2 test)."""
    from exporter.gate.targets import open_target
    from formats.hf.runner import HFRunner
    from formats.onnx.bundle import graph_path
    from formats.onnx.runner import ONNXRunner

    hf, ox32 = runners["llama"]
    d = quantized_dirs[quant]
    ox = ONNXRunner(d)
    graph, f32_graph = graph_path(d, quant), graph_path(ox32.dir, "float32")
    assert ox.variant == quant and graph.name == {"int8": "model_quantized.onnx", "int4": "model_q4.onnx"}[quant]
    # The float32 graph stays beside it (transformers.js's default dtype); the gate measures the quantized one.
    assert ONNXRunner(d, variant="float32").variant == "float32"
    target = open_target(d)
    runner = target.open()
    assert (target.dtype, runner.variant) == (quant, quant)
    runner.close()
    assert json.loads((d / "genai_config.json").read_text())["model"]["decoder"]["filename"] == f"onnx/{graph.name}"
    ops, float_weight_matmuls = _op_types(graph)
    assert "MatMulNBits" in ops
    assert json.loads((d / "lorax.json").read_text())["quantization"]["bits"] == {"int8": 8, "int4": 4}[quant]
    assert float_weight_matmuls == 0  # every weight MatMul, the lm_head included, is quantized
    assert _op_types(f32_graph)[1] == 15  # ... of 2 layers x 7 + lm_head
    if quant == "int4":
        assert graph.with_name(graph.name + ".data").stat().st_size > graph.stat().st_size
    size = sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*"))
    size32 = f32_graph.stat().st_size
    assert size < 0.7 * size32

    ids = _ids(hf)
    ref = [hf.logits(i) for i in ids]
    parity = compare(ref, [ox.logits(i) for i in ids], ids)
    other = HFRunner(tiny_model_factory(arch="llama", seed=1))
    unrelated = compare(ref, [other.logits(i) for i in ids], ids)
    assert parity.kld_mean < unrelated.kld_mean / 10, (parity, unrelated)
    assert parity.top1 > 0.25 and np.isfinite(parity.ppl_ratio)
    assert ox.generate(ids[0], 16) == ox.generate(ids[0], 16, use_cache=False)
    speed = ox.measure_decode(ids[0], 32)
    assert speed.new_tokens == 32 and speed.tokens_per_s > 0
    for k, v in {"bytes": size, "bytes_f32": size32, "tokens_per_s": speed.tokens_per_s,
                 "kld_mean": parity.kld_mean, "top1": parity.top1}.items():
        record_property(f"{quant}_{k}", v)
    with capsys.disabled():
        print(f"\n[onnx {quant}] {size} B ({size / size32:.2f} of f32), {speed.tokens_per_s:.0f} tok/s, "
              f"KLD {parity.kld_mean:.3g}, top-1 {parity.top1:.2f} (unrelated model: KLD {unrelated.kld_mean:.3g})")


def test_int4_bits_follow_the_module_names_on_fused_phi3(tiny_model_factory, tmp_path):
    """Roles come from the HF module each weight came from (matched by content), not from the order of the
    graph's MatMuls: on Phi-3's fused layers gate_up_proj/down_proj/lm_head get 8 bits, qkv_proj/o_proj 4, and
    the quantized graph still tracks the model (the fused gate/up halves are one weight)."""
    import onnx

    from formats.hf.runner import HFRunner
    from formats.onnx.export import export_onnx
    from formats.onnx.runner import ONNXRunner

    src = tiny_model_factory(arch="phi3")
    cfg = json.loads((src / "config.json").read_text())
    d = export_onnx(src, tmp_path / "onnx", quant="int4").dir
    graph = onnx.load(str(d / "onnx" / "model_q4.onnx"), load_external_data=False).graph
    bits_by_shape: dict[tuple[int, int], set[int]] = {}
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            bits_by_shape.setdefault((a["N"], a["K"]), set()).add(a["bits"])
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head = cfg["head_dim"] if cfg.get("head_dim") else hidden // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head
    assert bits_by_shape == {(qkv, hidden): {4}, (hidden, cfg["num_attention_heads"] * head): {4},
                             (2 * inter, hidden): {8}, (hidden, inter): {8}, (vocab, hidden): {8}}, bits_by_shape
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}
    hf = HFRunner(src)
    ids = _ids(hf)
    parity = compare([hf.logits(i) for i in ids], [ONNXRunner(d).logits(i) for i in ids], ids)
    assert parity.top1 > 0.5 and parity.kld_mean < 0.5, parity
