"""Quantize the float32 ONNX decoder's weights into onnxruntime's block-quantized ops.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int8    # onnx/model_quantized.onnx: 8-bit blocks
    lorax export adapter/ --out dist/ --onnx --onnx-quant int4    # onnx/model_q4.onnx: 4-bit blocks, the
                                                                   # form laptop/phone runtimes use

Every MatMul with a constant weight, the lm_head included, becomes `MatMulNBits` (com.microsoft; one scale
and one integer zero point per block of 32 inputs) and the token embedding's Gather becomes
`GatherBlockQuantized`; attention, norms, the KV cache and the graph's I/O stay float32. Both ops run in
onnxruntime's CPU provider, which transformers.js (onnxruntime-node), onnxruntime-genai and optimum use.

int8's weights are chosen by formats/onnx/blockquant.py (a weighted scale search per block). int4 is GPTQ
(formats/onnx/gptq.py): every decoder linear at 4 bits in blocks of 32, calibrated on the fine-tune's
training rows, with the lm_head at 8 bits; without calibration rows it is UNCALIBRATED's weighted search
(blocks of 16, v/down/gate at 8 bits). What each setting measured (KLD/top-1, decode tok/s vs float32 on 2
cores, side by side): docs/BENCHMARKS.md, `python scripts/sweep_onnx_quant.py` (SETTINGS below). Why the
shipped choices:
  - int8 dynamic quantization (`quantize_dynamic`, activations scaled per tensor per call) cost KLD 1.19,
    top-1 47% (LLM activation outliers ruin one shared scale), so both types are weight-only;
  - accuracy_level 4 lets onnxruntime's CPU kernel multiply in int8 (activations quantized per block at
    run time); level 0 (float) ran 12-20x slower. Its effect on quality is measured, not assumed (sweep);
  - integer zero points, because float ones (onnxruntime's HQQ) cannot take that int8 kernel: HQQ decoded
    at 0.13x float32;
  - onnxruntime's own round-to-nearest (min/max per block) is fast but lost KLD 0.7 on SmolLM2: the search
    keeps the speed and most of the quality;
  - 4-bit everywhere in blocks of 32 is what makes int4 fast (onnxruntime 1.32's 4-bit kernel in blocks of
    16, and its 8-bit one, are no faster than each other at SmolLM2's shapes), and GPTQ is what lets it pass
    the gate there: on the demo, against the trained model, KLD 0.049 / top-1 91.3% at 2.46x float32's
    decode (make bench), where the search in that layout lost 0.45 and the search's layout ran 1.8x. The lm_head
    stays 8-bit: at 4 bits even GPTQ lost 0.13 KLD.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class WeightQuant:
    """One weight-only setting."""

    bits: int
    # "gptq" (formats/onnx/gptq.py, 4-bit roles; needs calibration rows), "search" (lorax's weighted search),
    # "rtn" / "hqq" (onnxruntime's quantizers, for the sweep)
    algorithm: str
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    keep8: tuple[str, ...] = ()  # roles (ROLE_SUFFIXES) whose MatMuls get 8 bits instead
    keep8_block: int | None = None  # their block size (None: block_size)
    embedding_bits: int | None = None  # GatherBlockQuantized for the token embedding; None keeps float32
    weighted: bool = True  # "search": weigh by the importance matrix when the export has one

    def describe(self) -> dict:
        out = {"op": "MatMulNBits", **asdict(self), "keep8": list(self.keep8)}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items() if v is not None}

    def layout(self, role: str | None) -> tuple[int, int]:
        """(bits, block_size) of a MatMul weight with this role."""
        if self.bits == 4 and role in self.keep8:
            return 8, self.keep8_block or self.block_size
        return self.bits, self.block_size


LM_HEAD = "lm_head"
EMBEDDING = "embedding"
# A weight's role is the last part of its HF module name; fused projections (Phi-3's qkv_proj, gate_up_proj)
# are roles of their own, so a setting names them explicitly.
ROLE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
                 "down_proj", LM_HEAD)

# The weights a QLoRA merge loses most at 4 bits (demo fine-tune, one role at a time: v_proj, down_proj and
# gate_proj), kept at 8 bits with the lm_head; Phi-3's fused gate_up_proj holds gate_proj.
SENSITIVE = (LM_HEAD, "v_proj", "down_proj", "gate_proj", "gate_up_proj")

# Everything scripts/sweep_onnx_quant.py measures; QUANTIZERS are the ones `--onnx-quant` ships.
SETTINGS: dict[str, WeightQuant] = {
    "int8": WeightQuant(8, "search", symmetric=True, embedding_bits=8),
    "int8-ort-rtn": WeightQuant(8, "rtn", symmetric=True),
    "int4": WeightQuant(4, "gptq", keep8=(LM_HEAD,), embedding_bits=8),
    "int4-gptq-sensitive8": WeightQuant(4, "gptq", keep8=SENSITIVE, embedding_bits=8),
    "int4-gptq-b16": WeightQuant(4, "gptq", block_size=16, keep8=(LM_HEAD,), keep8_block=32, embedding_bits=8),
    "int4-search": WeightQuant(4, "search", block_size=16, keep8=SENSITIVE, embedding_bits=8),
    "int4-search-k8b32": WeightQuant(4, "search", block_size=16, keep8=SENSITIVE, keep8_block=32,
                                     embedding_bits=8),
    "int4-search-acc0": WeightQuant(4, "search", block_size=16, keep8=SENSITIVE, embedding_bits=8,
                                    accuracy_level=0),
    "int4-search-unweighted": WeightQuant(4, "search", block_size=16, keep8=SENSITIVE, embedding_bits=8,
                                          weighted=False),
    "int4-search-sym": WeightQuant(4, "search", block_size=16, symmetric=True, keep8=SENSITIVE, embedding_bits=8),
    "int4-search-b32": WeightQuant(4, "search", keep8=SENSITIVE, embedding_bits=8),
    "int4-search-b32-all4": WeightQuant(4, "search", keep8=(LM_HEAD,), embedding_bits=8),
    "int4-ort-rtn": WeightQuant(4, "rtn"),
    "int4-ort-hqq": WeightQuant(4, "hqq"),
}
QUANTIZERS: dict[str, WeightQuant] = {"int8": SETTINGS["int8"], "int4": SETTINGS["int4"]}
# What a calibrated method becomes without calibration rows (an HF dir exported alone, training data that
# moved): the weighted search's layout, which held the gate before GPTQ (docs/BENCHMARKS.md).
UNCALIBRATED: dict[str, str] = {"int4": "int4-search"}


# Protobuf cannot serialize a model past 2 GiB; larger ones keep their weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 2**24


def _external(path: Path) -> bool:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0) > _PROTOBUF_LIMIT


def role_of(hf_name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> q_proj; the embedding and lm_head by their own names."""
    parts = hf_name.split(".")
    stem = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    if stem == "embed_tokens":
        return EMBEDDING
    return stem if stem in ROLE_SUFFIXES else None


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


def hf_weight_names(hf_dir: Path) -> dict[tuple[tuple[int, ...], str], str]:
    """(shape, content digest) -> HF tensor name for every 2-D weight of the model in `hf_dir` (as float32).

    The exporter's constant folding renames the weights it transposes (val_83, ...); matching by content
    finds each graph weight's module, whatever the architecture lays out (fused projections included)."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.ndim == 2:
                    a = t.float().numpy()
                    out[(a.shape, _digest(a))] = name
    return out


@dataclass
class _Use:
    """One constant weight the graph multiplies or gathers with, as [rows, K] with rows = outputs / tokens."""

    node: object
    weight: np.ndarray
    hf_name: str | None


def _uses(model, hf_names: Mapping) -> tuple[list[_Use], list[_Use]]:
    """The MatMuls with a constant weight (directly, or through a Transpose of one) and the embedding Gathers."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    def named(w: np.ndarray) -> str | None:
        return hf_names.get((w.shape, _digest(w)))

    def transposed(name: str) -> np.ndarray | None:
        """The 2-D initializer behind `name` when `name` is its plain Transpose, in the initializer's layout."""
        src = producers.get(name)
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            return None
        perm = [a.ints for a in src.attribute if a.name == "perm"]
        if array(src.input[0]).ndim != 2 or (perm and list(perm[0]) != [1, 0]):
            return None
        return array(src.input[0])

    matmuls, gathers = [], []
    for node in graph.node:
        if node.op_type == "MatMul":
            b = node.input[1]
            if b in inits and array(b).ndim == 2:
                w = np.ascontiguousarray(array(b).T)  # MatMul's B is [K, N]; the ops want [N, K]
            elif (w := transposed(b)) is None:  # a tied lm_head: Transpose(embedding) -> already [N, K]
                continue
            matmuls.append(_Use(node, w.astype(np.float32), named(w)))
        elif node.op_type == "Gather":
            data = node.input[0]
            if data in inits and array(data).ndim == 2:
                w = array(data).astype(np.float32)
            elif (t := transposed(data)) is not None:  # the builder's tied embedding: Transpose(lm_head [K, N])
                w = np.ascontiguousarray(t.T).astype(np.float32)
            else:
                continue
            name = named(w)
            if name is not None and role_of(name) == EMBEDDING:
                gathers.append(_Use(node, w, name))
    return matmuls, gathers


def _weight_blocks(use: _Use, q: WeightQuant, bits: int, block: int, importance, hessian):
    """The weight's codes: GPTQ at 4 bits when the setting says so and the input's Hessian is known, else the
    weighted search (8-bit roles, or no calibration)."""
    from formats.onnx.blockquant import quantize_rows
    from formats.onnx.gptq import gptq_rows

    if q.algorithm == "gptq" and bits == 4 and hessian is not None:
        return gptq_rows(use.weight, hessian, bits, block, q.symmetric)
    if importance is None and hessian is not None:
        importance = hessian.diagonal().numpy()  # mean x² per input column: the importance matrix's entry
    return quantize_rows(use.weight, bits, block, importance, q.symmetric)


def _matmul_nbits(use: _Use, q: WeightQuant, blocks, prefix: str):
    from onnx import helper, numpy_helper

    from formats.onnx.blockquant import pack_matmul_nbits

    n, k = use.weight.shape
    bits, block = blocks.bits, blocks.codes.shape[-1]
    b, scales, zp = pack_matmul_nbits(blocks)
    inits = [numpy_helper.from_array(b, f"{prefix}.qweight"), numpy_helper.from_array(scales, f"{prefix}.scales")]
    inputs = [use.node.input[0], inits[0].name, inits[1].name]
    if not q.symmetric:
        inits.append(numpy_helper.from_array(zp, f"{prefix}.zero_points"))
        inputs.append(inits[-1].name)
    node = helper.make_node("MatMulNBits", inputs, list(use.node.output), name=f"{use.node.name}_Q{bits}",
                            domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=q.accuracy_level)
    return node, inits


def _gather_block_quantized(use: _Use, q: WeightQuant, prefix: str):
    from onnx import helper, numpy_helper

    from formats.onnx.blockquant import pack_gather, quantize_rows

    bits = q.embedding_bits
    blocks = quantize_rows(use.weight, bits, q.block_size, None, q.symmetric)
    data, scales, zp = pack_gather(blocks)
    inits = [numpy_helper.from_array(data, f"{prefix}.qdata"), numpy_helper.from_array(scales, f"{prefix}.scales")]
    inputs = [inits[0].name, use.node.input[1], inits[1].name]
    if not q.symmetric:
        inits.append(numpy_helper.from_array(zp, f"{prefix}.zero_points"))
        inputs.append(inits[-1].name)
    node = helper.make_node("GatherBlockQuantized", inputs, list(use.node.output), name=f"{use.node.name}_Q{bits}",
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=q.block_size, bits=bits)
    return node, inits


def live_nodes(nodes: list, outputs: set[str]) -> list:
    """`nodes` without those whose results nothing reads any more (a tied lm_head's Transpose of the float
    embedding, once both its readers are quantized: else the float32 weight would stay in the file; the GQA
    builder's seqlens subgraph once formats/onnx/gqa.py replaces it)."""
    while True:
        read = outputs | {i for n in nodes for i in n.input}
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def _search_quantize(model, q: WeightQuant, hf_dir: Path, importance: Mapping[str, np.ndarray] | None,
                     calibration: Sequence[Sequence[int]] | None) -> None:
    """Rewrite `model` in place: each weight MatMul -> MatMulNBits, the embedding Gather -> GatherBlockQuantized."""
    from onnx import helper

    from formats.errors import FormatError
    from lorax_common.log import progress

    matmuls, gathers = _uses(model, hf_weight_names(hf_dir))
    unnamed = [u.node.name for u in matmuls if u.hf_name is None]
    if unnamed:  # every weight must be traced back to its module, or the role table cannot apply
        raise FormatError(f"ONNX quantization: {len(unnamed)} MatMul weight(s) match no tensor of {hf_dir} "
                          f"(first: {unnamed[0]}); the graph was not exported from that model")
    hessians = {}
    if q.algorithm == "gptq":
        if not calibration:
            raise FormatError("ONNX quantization gptq: no calibration rows (GPTQ needs the model's inputs on "
                              "real text)")
        from formats.onnx.gptq import collect_hessians

        hessians = collect_hessians(hf_dir, calibration, {u.hf_name for u in matmuls})
    replace: dict[int, object] = {}
    new_inits = []
    with progress(total=len(matmuls) + len(gathers), desc="onnx quantize", unit="weight", leave=False) as bar:
        for i, use in enumerate(matmuls):
            role = role_of(use.hf_name)
            role = LM_HEAD if role == EMBEDDING else role  # a tied lm_head multiplies by the embedding
            bits, block = q.layout(role)
            imp = importance.get(use.hf_name) if (importance and q.weighted) else None
            if use.weight.shape[1] % block:
                continue  # K not a multiple of the block: left float32
            blocks = _weight_blocks(use, q, bits, block, imp, hessians.get(use.hf_name))
            node, inits = _matmul_nbits(use, q, blocks, f"lorax.q{i}")
            replace[id(use.node)] = node
            new_inits += inits
            bar.update()
        if q.embedding_bits:
            for i, use in enumerate(gathers):
                if use.weight.shape[1] % q.block_size == 0:
                    node, inits = _gather_block_quantized(use, q, f"lorax.emb{i}")
                    replace[id(use.node)] = node
                    new_inits += inits
                bar.update()
    nodes = live_nodes([replace.get(id(n), n) for n in model.graph.node], {o.name for o in model.graph.output})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _ort_quantize(model, q: WeightQuant):
    """onnxruntime's own MatMulNBits quantizers (round-to-nearest or HQQ), kept as the sweep's baselines."""
    from onnx import helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if q.algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=q.bits)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=q.symmetric,
                                              accuracy_level=q.accuracy_level, bits=q.bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    for node in out.graph.node:  # HQQ's config takes no accuracy level: set it on each node
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", q.accuracy_level)])
    return out


def setting(method: str | WeightQuant, calibrated: bool = True) -> WeightQuant:
    """The WeightQuant of a method name; without calibration rows, what UNCALIBRATED says it becomes."""
    if isinstance(method, WeightQuant):
        return method
    if not calibrated and method in UNCALIBRATED:
        method = UNCALIBRATED[method]
    return {**SETTINGS, **QUANTIZERS}[method]


def wants_importance(method: str | None, calibrated: bool = True) -> bool:
    """Whether `--onnx-quant method` weighs its rounding by an importance matrix (4 bits: the search picks
    scales by it; 8 bits only round; GPTQ weighs by its own Hessians)."""
    if method is None:
        return False
    q = setting(method, calibrated)
    return q.algorithm == "search" and q.weighted and q.bits == 4


def wants_calibration(method: str | None) -> bool:
    """Whether `--onnx-quant method` needs calibration rows (GPTQ: each weight's input Hessian)."""
    return method is not None and setting(method).algorithm == "gptq"


def quantize(src: Path, dest: Path, method: str | WeightQuant, hf_dir: Path, external_data: bool | None = None,
             importance: Mapping[str, np.ndarray] | None = None,
             calibration: Sequence[Sequence[int]] | None = None) -> Path:
    """Quantize the float32 graph at `src` (exported from the HF model in `hf_dir`) into `dest` with `method`
    (a key of QUANTIZERS or SETTINGS, or a WeightQuant). `importance`: HF weight name -> mean x² per input
    column (formats.gguf.imatrix.hf_importance). Weights go to `dest`.data past protobuf's limit
    (`external_data=None`) or as asked."""
    import onnx

    q = setting(method, calibrated=bool(calibration))
    big = _external(src) if external_data is None else external_data
    model = onnx.load(str(src))
    if q.algorithm in ("search", "gptq"):
        _search_quantize(model, q, Path(hf_dir), importance, calibration)
    else:
        model = _ort_quantize(model, q)
    if big:
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dest.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dest))
    return dest
