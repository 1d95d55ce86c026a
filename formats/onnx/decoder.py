"""Trace an HF causal LM into one ONNX decoder graph with KV cache (torch.onnx, dynamo exporter).

    from formats.onnx.decoder import trace_decoder
    trace_decoder(Path("merged/"), Path("dist/onnx/model.onnx"), dtype="float32")

Used by `lorax export --onnx` (formats/onnx/export.py). A thin wrapper gives the graph flat inputs
and outputs with optimum's names (formats/onnx/layout.py); one graph serves prefill (past length 0)
and decode, with dynamic batch, sequence and past lengths, in standard ONNX ops.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.export import Dim

from formats.onnx import layout
from lorax_common.scoped import logger_level

# Sample sizes for tracing: all >= 2, so torch.export keeps every axis symbolic (it specializes
# sizes 0 and 1); the graph still runs with past length 0 (prefill) and sequence length 1 (decode).
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 4


class DecoderWithCache(torch.nn.Module):
    """Flat tensors in, flat tensors out: the graph boundary optimum expects."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        # No config: every layer is a full DynamicLayer, so present = past + new on every layer (a
        # sliding-window layer would crop it and break optimum's past/present contract); the model's
        # own attention masks still apply any sliding window.
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def trace_inputs(geom: layout.CacheGeometry, vocab: int, dtype: torch.dtype):
    """Sample arguments and their dynamic axes, named as optimum names them."""
    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    batch, seq = Dim(layout.BATCH), Dim(layout.SEQUENCE)
    past, total = Dim(layout.PAST), Dim(layout.TOTAL)
    cache = [(torch.randn(geom.shape(b, p), dtype=dtype), torch.randn(geom.shape(b, p), dtype=dtype))
             for _ in range(geom.layers)]
    args = (
        torch.randint(0, vocab, (b, s)),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.arange(p, p + s).expand(b, s).contiguous(),
        cache,
    )
    kv_axes = {0: batch, 2: past}
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                      [(kv_axes, kv_axes) for _ in range(geom.layers)])
    return args, dynamic_shapes


def tidy(model) -> None:
    """onnxscript's optimizer without its pattern rewrites: fold constants, drop dead nodes, dedupe, and drop
    the exporter's per-node metadata (stack traces naming this machine's files).

    The rewrite rules (what `optimize=True` adds) spent over half of SmolLM2's export time matching
    patterns (export CPU time 175 s -> 95 s without them) and left decode speed unchanged (42-47 vs
    45 ms/token, one thread); onnxruntime's load-time optimizer does that work. Weights are never
    folded (onnxscript's size limits).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants

    fold_constants(model)
    for node in model.graph.all_nodes():  # the exporter's provenance: stack traces with this machine's paths,
        node.metadata_props.clear()      # ~2 KB a node; not shipped
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def trace_decoder(hf_dir: Path, dest: Path, dtype: str = "float32", opset: int | None = None,
                  external_data: bool | None = None) -> Path:
    """Trace the model in `hf_dir` into `dest`; weights go to `dest`.data past protobuf's 2 GB limit
    (`external_data=None`) or as asked."""
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    # sdpa: the exporter decomposes it into MatMul/Softmax with the mask folded in; the float16 graph
    # keeps the model's own float32 upcasts (RMSNorm, RoPE), as the HF float16 model computes.
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="sdpa").eval()
    geom = layout.cache_geometry(model.config.to_dict())
    args, dynamic_shapes = trace_inputs(geom, model.config.vocab_size, torch_dtype)
    # torch.onnx warns once per torchvision op it cannot register: noise for a decoder (silenced for this
    # export only; the caller's torch.onnx logging is back afterwards)
    with torch.no_grad(), logger_level("torch.onnx", logging.ERROR):
        program = torch.onnx.export(
            DecoderWithCache(model).eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes,
            opset_version=opset, input_names=layout.input_names(geom.layers),
            output_names=layout.output_names(geom.layers), optimize=False, verbose=False,
        )
    tidy(program.model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    program.save(dest, external_data=external_data)
    return dest
