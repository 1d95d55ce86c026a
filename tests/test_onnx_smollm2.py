"""ONNX export of the real SmolLM2-135M-Instruct: parity with transformers, cache, batch, quantized types.

Slow (one float32 trace ~3-6 min on 2 cores, one float16 trace, two quantizations): `pytest -m slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.gate.metrics import compare, max_abs_logit

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]
TEXT = (
    "The history of the bicycle spans more than two centuries. Early designs had no pedals: riders pushed "
    "themselves along with their feet. Pedals attached to the front wheel came next, and then the chain drive "
    "moved the rider closer to the ground, which made cycling safer and far more popular. Pneumatic tyres, "
    "invented shortly afterwards, made the ride smooth enough for long journeys on rough roads."
)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from formats.hf.runner import HFRunner

    return HFRunner(smollm2_dir)


@pytest.fixture(scope="module")
def ids(hf) -> list[list[int]]:
    chats = [hf.tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                              tokenize=True) for c in CHATS]
    chats = [list(c["input_ids"]) if hasattr(c, "keys") else list(c) for c in chats]
    return [*chats, hf.tokenize(TEXT)]


@pytest.fixture(scope="module")
def ref(hf, ids) -> list[np.ndarray]:
    return [hf.logits(i) for i in ids]


@pytest.fixture(scope="module")
def f32_dir(smollm2_dir, tmp_path_factory) -> Path:
    from formats.onnx.export import export_onnx

    return export_onnx(smollm2_dir, tmp_path_factory.mktemp("smol") / "onnx").dir


@pytest.fixture(scope="module")
def f32(f32_dir):
    from formats.onnx.runner import ONNXRunner

    return ONNXRunner(f32_dir, threads=2)


def test_float32_parity(f32, ref, ids, record_property):
    parity = compare(ref, [f32.logits(i) for i in ids], ids)
    record_property("f32", parity.as_dict())
    print(f"\n[smollm2 onnx f32] {parity}")
    assert parity.positions > 150
    assert parity.max_abs_logit <= 1e-3, parity
    assert parity.kld_mean <= 1e-5, parity
    assert parity.top1 == 1.0


def test_float32_greedy_equals_hf_and_recompute(f32, hf, ids):
    for x in ids[:3]:
        cached = f32.generate(x, 32)
        assert cached == hf.generate(x, 32)
        assert cached == f32.generate(x, 32, use_cache=False)


def test_float32_left_padded_batch(f32, ids):
    for row, batched in zip(ids, f32.logits_batch(ids), strict=True):
        assert max_abs_logit(f32.logits(row), batched) <= 1e-3
    assert f32.generate_batch(ids[:3], 16) == [f32.generate(x, 16) for x in ids[:3]]


def test_side_files_carry_legacy_keys(f32_dir):
    cfg = json.loads((f32_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 == cfg["rope_parameters"]["rope_theta"]
    assert json.loads((f32_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_float16(smollm2_dir, ref, ids, tmp_path):
    from formats.onnx.export import export_onnx
    from formats.onnx.runner import ONNXRunner

    r = ONNXRunner(export_onnx(smollm2_dir, tmp_path / "onnx", dtype="float16").dir, threads=2)
    parity = compare(ref, [r.logits(i) for i in ids], ids)
    print(f"\n[smollm2 onnx f16] {parity}")
    assert parity.kld_mean <= 1e-3, parity
    assert parity.top1 >= 0.97, parity


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_recorded(smollm2_dir, f32_dir, f32, ref, ids, quant, tmp_path, record_property, capsys):
    import shutil

    from exporter.gate.thresholds import limits_for
    from formats.onnx.bundle import graph_path
    from formats.onnx.quantize import quantize
    from formats.onnx.runner import ONNXRunner

    d = tmp_path / quant
    shutil.copytree(f32_dir, d)
    graph = quantize(graph_path(f32_dir, "float32"), graph_path(d, quant), quant, smollm2_dir)
    r = ONNXRunner(d, threads=2, variant=quant)
    parity = compare(ref, [r.logits(i) for i in ids], ids)
    size = sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*"))
    size32 = sum(p.stat().st_size for p in (f32_dir / "onnx").glob("model.onnx*"))
    speed, speed32 = r.measure_decode(ids[0], 64), f32.measure_decode(ids[0], 64)
    line = (f"[smollm2 onnx {quant}] {size / 1e6:.0f} MB ({size / size32:.2f} of f32), "
            f"{speed.tokens_per_s:.1f} tok/s (f32 {speed32.tokens_per_s:.1f}, same run), KLD {parity.kld_mean:.4f}, "
            f"p99 {parity.kld_p99:.3f}, top-1 {parity.top1:.3f}, PPL ratio {parity.ppl_ratio:.3f}")
    record_property(quant, line)
    with capsys.disabled():
        print("\n" + line)
    assert size < {"int8": 0.5, "int4": 0.4}[quant] * size32
    # The gate's own limits for this type (exporter/gate/thresholds.py) must hold on the real model.
    limits = limits_for("onnx", quant)
    assert parity.kld_mean <= limits["kld_mean"], parity
    assert parity.top1 >= limits["top1"], parity
    # Measured here (2026-12-06, the base without an importance matrix): int8 KLD 0.0069, top-1 0.938; int4
    # 0.0704, 0.866 on the traced graph; on the GroupQueryAttention graph (formats/onnx/gqa.py) int8 0.0058 /
    # 0.933, int4 0.0725 / 0.856 (onnxruntime's own round-to-nearest int4: 0.71, 0.59). A quantizer that falls
    # back towards round-to-nearest fails these, well inside the table's row. With no calibration rows (the
    # base has no fine-tune) int4 here is quantize.UNCALIBRATED's search; GPTQ's int4 is gated on the demo.
    assert parity.kld_mean <= {"int8": 0.012, "int4": 0.11}[quant], parity
    assert parity.top1 >= {"int8": 0.9, "int4": 0.82}[quant], parity
