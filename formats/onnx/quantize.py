"""Quantize the float32 ONNX decoder's weights with onnxruntime.quantization into MatMulNBits.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int8    # onnx/model_quantized.onnx: 8-bit blocks
    lorax export adapter/ --out dist/ --onnx --onnx-quant int4    # onnx/model_q4.onnx: 4-bit blocks, the
                                                                   # form laptop/phone runtimes use

Every MatMul with a constant weight, the lm_head included, becomes `MatMulNBits` (block-wise weights,
one scale per block); attention, norms, the embedding Gather, the KV cache and the graph's I/O stay
float32. What each setting measured on SmolLM2-135M (KLD/top-1 vs float32, decode tok/s on 2 cores, all
in one process): docs/BENCHMARKS.md, `python scripts/sweep_onnx_quant.py` (SETTINGS below).
Why these choices:
  - int8 dynamic quantization (`quantize_dynamic`, activations scaled per tensor per call): KLD
    1.19, top-1 47% -- LLM activation outliers ruin one shared scale -- so int8 is weight-only 8-bit;
  - accuracy_level 4 lets onnxruntime's CPU kernel multiply in int8 (activations quantized per block
    at run time): level 0 (float) ran 12-20x slower;
  - HQQ (float zero points) is accurate but its MatMulNBits cannot take that int8 kernel (0.13x float32
    decode); integer zero points (asymmetric RTN) are fast (2.5x) but lose far more (KLD 0.71, top-1 0.59);
  - the loss sits in v_proj and down_proj: those at 8 bits (and the lm_head) give KLD 0.19, top-1 0.88,
    at 1.37x float32's decode (SmolLM2, 2 cores, 2026-12-04, a loaded machine), but 0.42 of float32's
    bytes and p99 KLD 3.27: past int4's size bound and row, so `--onnx-quant int4` still ships HQQ (below).
    Block clipping alone (clip.py) did not help (head8: KLD 0.83 clipped vs 0.62 plain).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightQuant:
    """One weight-only setting: onnxruntime's MatMulNBits with these parameters."""

    bits: int
    algorithm: str  # "rtn" (onnxruntime's kernel), "clip" (clip.py, then rtn), "hqq"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    keep8: tuple[str, ...] = ()  # roles (ROLES) whose MatMuls get 8 bits instead

    def describe(self) -> dict:
        return {"op": "MatMulNBits", **asdict(self), "keep8": list(self.keep8)}


# Role of each weight MatMul in a layer, in the order the traced graph has them (formats/onnx/decoder.py
# traces Llama-style layers: attention projections, then the MLP), and the final projection.
LAYER_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"

# Everything scripts/sweep_onnx_quant.py measures; QUANTIZERS are the ones `--onnx-quant` ships.
SETTINGS: dict[str, WeightQuant] = {
    "int8": WeightQuant(8, "rtn", symmetric=True),
    "int4-hqq-b32": WeightQuant(4, "hqq"),
    "int4-rtn-asym-b32": WeightQuant(4, "rtn"),
    "int4-rtn-sym-b32": WeightQuant(4, "rtn", symmetric=True),
    "int4-rtn-asym-b128": WeightQuant(4, "rtn", block_size=128),
    "int4-rtn-asym-b32-head8": WeightQuant(4, "rtn", keep8=(LM_HEAD,)),
    "int4-clip-b32-head8": WeightQuant(4, "clip", keep8=(LM_HEAD,)),
    "int4-clip-b32-head8-vd8": WeightQuant(4, "clip", keep8=(LM_HEAD, "v_proj", "down_proj")),
    "int4-clip-b64-head8-vd8": WeightQuant(4, "clip", block_size=64, keep8=(LM_HEAD, "v_proj", "down_proj")),
    "int4-clip-b32-head8-vd8-acc0": WeightQuant(4, "clip", accuracy_level=0,
                                                keep8=(LM_HEAD, "v_proj", "down_proj")),
    # the sensitive weights at 8 bits without clipping (docs/BENCHMARKS.md, second run): p99 better, top-1 worse
    "int4-rtn-asym-b32-vd8": WeightQuant(4, "rtn", keep8=("v_proj", "down_proj")),
    "int4-rtn-asym-b32-head8-vd8": WeightQuant(4, "rtn", keep8=(LM_HEAD, "v_proj", "down_proj")),
}
# int4 ships HQQ: the faster mixed 4/8-bit settings above keep v_proj/down_proj/lm_head at 8 bits next to a
# float32 embedding, which makes the graph 0.42 of float32 (SmolLM2: 228 of 543 MB), past int4's size bound
# (< 0.4, tests/test_onnx_smollm2.py), and the clip variant's p99 KLD (3.27) is past int4's row (2.5).
# A quantized embedding (GatherBlockQuantized) is what would let the fast setting ship; not done yet.
QUANTIZERS: dict[str, WeightQuant] = {"int8": SETTINGS["int8"], "int4": SETTINGS["int4-hqq-b32"]}

# What each shipped method writes, recorded in the export's lorax.json.
DESCRIPTIONS: dict[str, dict] = {name: q.describe() for name, q in QUANTIZERS.items()}

# Protobuf cannot serialize a model past 2 GiB; larger ones keep their weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 2**24


def _external(path: Path) -> bool:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0) > _PROTOBUF_LIMIT


def weight_roles(model) -> dict[str, str]:
    """MatMul node name -> role, for the MatMuls whose second input is a weight initializer."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    head = [n for n in nodes if "logits" in n.output]
    body = [n for n in nodes if n not in head]
    roles = {n.name: LM_HEAD for n in head}
    if len(body) % len(LAYER_ROLES) == 0:  # else the layers are not the shape LAYER_ROLES describes
        roles.update({n.name: LAYER_ROLES[i % len(LAYER_ROLES)] for i, n in enumerate(body)})
    return roles


def _clip_weights(model, names: set[str], block_size: int) -> None:
    from onnx import numpy_helper

    from formats.onnx.clip import clip_blocks

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name in names:
            t = inits[node.input[1]]
            t.CopyFrom(numpy_helper.from_array(clip_blocks(numpy_helper.to_array(t), block_size), t.name))


def _config(q: WeightQuant, bits: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    if q.algorithm == "hqq" and bits == 4:
        return HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=4)
    symmetric = q.symmetric if bits == q.bits else True
    return DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=symmetric,
                                        accuracy_level=q.accuracy_level, bits=bits)


def _set_accuracy_level(model, level: int) -> None:
    """HQQ's config takes no accuracy level; it is a plain attribute of each MatMulNBits node."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])


def quantize(src: Path, dest: Path, method: str | WeightQuant, external_data: bool | None = None) -> Path:
    """Quantize the float32 graph at `src` into `dest` with `method` (a key of QUANTIZERS or SETTINGS, or
    a WeightQuant); weights go to `dest`.data past protobuf's limit (`external_data=None`) or as asked."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    q = method if isinstance(method, WeightQuant) else {**SETTINGS, **QUANTIZERS}[method]
    big = _external(src) if external_data is None else external_data
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".prep.") as work:
        # onnxruntime's recommended pre-pass: its constant folding turns a tied lm_head's
        # Transpose(embedding) into a weight initializer, so the largest MatMul gets quantized too.
        prepped = Path(work) / "model.onnx"
        quant_pre_process(src, prepped, skip_symbolic_shape=True, save_as_external_data=_external(src),
                          all_tensors_to_one_file=True, external_data_location="model.onnx.data")
        model = onnx.load(str(prepped))
        roles = weight_roles(model)
        eight = {name for name, role in roles.items() if role in q.keep8} if q.bits == 4 else set()
        if q.algorithm == "clip":
            _clip_weights(model, set(roles) - eight, q.block_size)
        quantizer = MatMulNBitsQuantizer(model, algo_config=_config(q, q.bits), nodes_to_exclude=sorted(eight))
        quantizer.process()
        if eight:
            quantizer = MatMulNBitsQuantizer(quantizer.model.model, algo_config=_config(q, 8),
                                             nodes_to_include=sorted(eight))
            quantizer.process()
        _set_accuracy_level(quantizer.model.model, q.accuracy_level)
        quantizer.model.save_model_to_file(str(dest), use_external_data_format=big)
    return dest
