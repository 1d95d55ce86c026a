"""Build the decoder graph with GroupQueryAttention, as onnxruntime-genai's model builder writes it.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int4   # llama/mistral/qwen2/qwen3: this graph

    from formats.onnx.gqa import build_gqa_decoder
    build_gqa_decoder(Path("merged/"), Path("dist/onnx/onnx/model.onnx"))

Why: on a CPU, decode time of a small model is mostly per-node overhead, not the weights. The traced
graph (formats/onnx/decoder.py) has ~2,400 nodes for SmolLM2; the builder's has ~340 (fused attention
with rotary inside, SkipSimplifiedLayerNormalization), so the same weights decode 1.5x faster in
float32 and ~2.8x faster in int4 (docs/BENCHMARKS.md). The builder (`onnxruntime_genai.models.builder`,
run in a child process so its imports and settings stay there) writes the graph; lorax then makes it
honour left padding, which its graph does not: the builder derives each row's length from the mask's
sum, so a left-padded row attends to its pads and ropes from the wrong position (measured: KLD 2.8 on
the padded row). `pad_aware` gives it optimum's `position_ids` input (fed to the rotary) and an additive
attention bias built from the mask, with every row's cache length set to the mask's width, so batched
left-padded prefill equals one-at-a-time (tests/test_onnx_export.py) and every client that feeds
position_ids (transformers.js, optimum, onnxruntime-genai) gets the positions it computes.

Only where the builder's graph was measured equal to transformers (max KLD ~1e-12 on tiny models):
`GQA_ARCHS`. The builder 0.18 fails on transformers 5's configs of phi3, gemma3 and smollm3; those
keep the traced graph.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from formats.errors import FormatError
from formats.onnx import layout
from formats.onnx.quantize import live_nodes

# model_types whose builder graph matched transformers on a tiny model (llama covers Llama 3.2 and SmolLM2).
GQA_ARCHS = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Builder options: separate q/k/v MatMuls, so lorax's quantizer can give v_proj its own bit width
# (formats/onnx/quantize.py SENSITIVE); the packed qkv would force one width on all three.
_BUILDER_OPTIONS = ("disable_qkv_fusion=true",)
_PROTOBUF_LIMIT = 2 * 1024**3
# Added to the attention score of a padded key: float32's lowest, as transformers masks (finite, so a
# query that sees only pads gets a uniform softmax instead of NaN).
_MASKED = -3.4028234663852886e38


def uses_gqa(config: dict, dtype: str) -> bool:
    """True when `lorax export --onnx` writes the builder's graph for this model (float32 graphs only)."""
    return dtype == "float32" and config.get("model_type") in GQA_ARCHS


def run_builder(hf_dir: Path, out: Path) -> Path:
    """The builder's float32 CPU graph of `hf_dir` in `out` (model.onnx + model.onnx.data); offline."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(out / "cache"), "--extra_options", *_BUILDER_OPTIONS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    graph = out / "model.onnx"
    if proc.returncode != 0 or not graph.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FormatError(f"onnxruntime-genai's model builder failed on {hf_dir}: {tail[0]} "
                          f"(pip install 'onnxruntime-genai>=0.18', or pass --onnx-dtype float16 for the traced graph)")
    return graph


def pad_aware(model) -> None:
    """Make every GroupQueryAttention node take optimum's position_ids and mask padded keys (in place).

    The builder feeds GQA `seqlens_k = sum(mask) - 1`, which assumes right padding. Here every row's
    length is the mask's width (the cache holds the pads, as the traced graph's does), the pads get a
    -inf-like bias, and the rotary reads the positions the client computed.
    """
    from onnx import TensorProto, helper

    g = model.graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not gqa:
        raise FormatError("the builder's graph has no GroupQueryAttention node; cannot make it pad-aware")
    mask, ids, pos = layout.INPUTS[1], layout.INPUTS[0], layout.INPUTS[2]
    p = "/lorax/pad/"

    def const(name: str, value, dtype=TensorProto.INT64) -> str:
        g.initializer.append(helper.make_tensor(p + name, dtype, [len(value)], value))
        return p + name

    one, zero, two = const("one", [1]), const("zero", [0]), const("two", [2])
    nodes = [
        helper.make_node("Shape", [mask], [p + "mask_shape"]),
        helper.make_node("Slice", [p + "mask_shape", zero, one], [p + "batch"]),
        helper.make_node("Slice", [p + "mask_shape", one, two], [p + "total"]),
        helper.make_node("Shape", [ids], [p + "ids_shape"]),
        helper.make_node("Slice", [p + "ids_shape", one, two], [p + "seq"]),
        # every row's cache length - 1, as GQA's seqlens_k
        helper.make_node("Sub", [p + "total", one], [p + "last"]),
        helper.make_node("Expand", [p + "last", p + "batch"], [p + "seqlens64"]),
        helper.make_node("Cast", [p + "seqlens64"], [p + "seqlens"], to=TensorProto.INT32),
        # bias[b, 0, s, t] = 0 where mask[b, t] else lowest float
        helper.make_node("Cast", [mask], [p + "maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [p + "maskf", const("onef", [1.0], TensorProto.FLOAT)], [p + "inv"]),
        helper.make_node("Mul", [p + "inv", const("masked", [-_MASKED], TensorProto.FLOAT)], [p + "bias2"]),
        helper.make_node("Unsqueeze", [p + "bias2", const("axes", [1, 2])], [p + "bias4"]),
        helper.make_node("Concat", [p + "batch", one, p + "seq", p + "total"], [p + "bias_shape"], axis=0),
        helper.make_node("Expand", [p + "bias4", p + "bias_shape"], [p + "bias"]),
    ]
    for n in gqa:
        while len(n.input) < 11:
            n.input.append("")
        n.input[5], n.input[10] = p + "seqlens", p + "bias"
        if _attr(n, "do_rotary"):
            _rotary_outside(g, n, pos)
    for i, n in enumerate(nodes):
        g.node.insert(i, n)
    if pos not in {i.name for i in g.input}:
        at = [i.name for i in g.input].index(mask) + 1
        g.input.insert(at, helper.make_tensor_value_info(pos, TensorProto.INT64, [layout.BATCH, layout.SEQUENCE]))
    live = live_nodes(list(g.node), {o.name for o in g.output})  # the builder's seqlens subgraph is dead now
    del g.node[:]
    g.node.extend(live)


def windows(config: dict) -> list[int]:
    """Each layer's sliding window as GQA's local_window_size (-1: full attention), from config.json.

    transformers 5 names per-layer kinds in `layer_types`; Mistral has one `sliding_window` for every layer;
    Qwen2/3 carry a `sliding_window` that only applies with `use_sliding_window`.
    """
    n, window = config["num_hidden_layers"], config.get("sliding_window")
    types = config.get("layer_types")
    if types:
        return [window if kind == "sliding_attention" and window else -1 for kind in types]
    if not window or config.get("use_sliding_window") is False:
        return [-1] * n
    return [window] * n


def set_windows(model, config: dict) -> None:
    """Write each layer's window into its GQA node (in place). The builder 0.18 reads no sliding window
    from transformers 5's Mistral config and writes -1 (measured: KLD 3.0 against HF with a window of 4;
    GQA's local_window_size = HF's sliding_window matched it to 1e-12)."""
    per_layer = windows(config)
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(re.search(r"layers\.(\d+)/", node.name).group(1))
        for a in node.attribute:
            if a.name == "local_window_size":
                a.i = per_layer[layer]


def _attr(node, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _rotary_outside(g, node, pos: str) -> None:
    """Rotate q and k with RotaryEmbedding at `pos` before `node`, and turn GQA's own rotary off.

    GQA's rotary reads position_ids only for a prompt; at a decode step it takes the position from
    the cache length, which counts a left-padded row's pads (measured: KLD 0.12 at the first decode
    step of a padded row). RotaryEmbedding always reads position_ids.
    """
    from onnx import helper

    heads = {0: _attr(node, "num_heads"), 1: _attr(node, "kv_num_heads")}
    at = list(g.node).index(node)
    for slot, n_heads in heads.items():
        rotated = f"{node.input[slot]}/lorax_rotary"
        g.node.insert(at, helper.make_node(
            "RotaryEmbedding", [node.input[slot], pos, node.input[7], node.input[8]], [rotated],
            name=f"{node.name}/lorax_rotary_{slot}", domain="com.microsoft", num_heads=n_heads,
            interleaved=_attr(node, "rotary_interleaved")))
        node.input[slot] = rotated
    node.input[7], node.input[8], node.input[9] = "", "", ""
    for a in node.attribute:
        if a.name == "do_rotary":
            a.i = 0


def optimum_io(model, geom: layout.CacheGeometry) -> None:
    """Graph inputs and outputs in optimum's order (per layer: key, value; the builder lists every key
    first) and the cache's fixed axes as numbers (the builder leaves head_dim symbolic). Clients feed
    by name; this is what `onnx` shows and what optimum's own exports have (layout.py)."""
    g = model.graph
    caches = {**{n: layout.PAST for n in layout.past_names(geom.layers)},
              **{n: layout.TOTAL for n in layout.present_names(geom.layers)}}
    for v in [*g.input, *g.output]:
        if v.name in caches:
            dims = v.type.tensor_type.shape.dim
            dims[1].dim_value, dims[2].dim_param, dims[3].dim_value = geom.kv_heads, caches[v.name], geom.head_dim
    layers = geom.layers
    for field, names in ((g.input, layout.input_names(layers)), (g.output, layout.output_names(layers))):
        by_name = {v.name: v for v in field}
        ordered = [by_name.pop(n) for n in names if n in by_name] + list(by_name.values())
        copies = [type(v)() for v in ordered]
        for c, v in zip(copies, ordered, strict=True):
            c.CopyFrom(v)
        del field[:]
        field.extend(copies)


def build_gqa_decoder(hf_dir: Path, dest: Path, external_data: bool | None = None) -> Path:
    """The builder's graph of `hf_dir`, made pad-aware, in `dest` (weights in `dest`.data past 2 GB or as asked)."""
    import onnx

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gqa-", dir=dest.parent) as tmp:
        model = onnx.load(str(run_builder(hf_dir, Path(tmp))))
        config = json.loads((hf_dir / "config.json").read_text())
        set_windows(model, config)
        pad_aware(model)
        optimum_io(model, layout.cache_geometry(config))
        for node in model.graph.node:  # the builder names nodes by module path; nothing machine-specific
            del node.metadata_props[:]
        big = sum(t.ByteSize() for t in model.graph.initializer) >= _PROTOBUF_LIMIT
        if external_data if external_data is not None else big:
            onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=dest.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(dest))
    return dest
