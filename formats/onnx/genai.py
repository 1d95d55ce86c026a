"""genai_config.json for onnxruntime-genai, derived from the model's configs and the graph itself.

    import onnxruntime_genai as og
    model = og.Model("dist/onnx")              # reads dist/onnx/genai_config.json -> onnx/model*.onnx

onnxruntime-genai needs this file beside the tokenizer files; lorax writes it from config.json
(geometry, context length), generation_config.json (every end-of-generation id, the sampling
defaults) and the graph's own I/O (the cache layout). lorax's graphs (traced or GQA) return
present = past + the new keys/values, so `present` is longer than `past`: genai must then hand over a
fresh buffer each step (`past_present_share_buffer: false`); with true it feeds a max-length buffer the
graph's attention does not expect (measured on the traced graph: wrong tokens after the first step;
the GQA graph derives each row's cache length from the mask's width, which a shared buffer breaks).
"""

from __future__ import annotations

import json
from pathlib import Path

from formats.onnx import layout

# generation_config.json key -> (genai search key, default when the model's file does not say).
# Defaults are transformers' own GenerationConfig defaults, so genai decodes as `generate` would.
SEARCH_KEYS: dict[str, tuple[str, object]] = {
    "do_sample": ("do_sample", False),
    "temperature": ("temperature", 1.0),
    "top_k": ("top_k", 50),
    "top_p": ("top_p", 1.0),
    "repetition_penalty": ("repetition_penalty", 1.0),
    "num_beams": ("num_beams", 1),
    "length_penalty": ("length_penalty", 1.0),
    "no_repeat_ngram_size": ("no_repeat_ngram_size", 0),
    "min_length": ("min_length", 0),
}


def _ids(*values) -> list[int]:
    """Every id named in the given fields (each an int, a list, or None), first-seen order."""
    out: list[int] = []
    for v in values:
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return out


def cache_shares_buffer(graph_path: Path) -> bool:
    """True only if each `present` cache output has the same length axis as its `past` input (an
    in-place cache, as GroupQueryAttention graphs have); lorax's Concat cache grows, so False."""
    import onnx

    g = onnx.load(str(graph_path), load_external_data=False).graph

    def length_axis(values, name: str) -> str | int:
        dim = next(v for v in values if v.name == name).type.tensor_type.shape.dim[2]
        return dim.dim_param or dim.dim_value

    return length_axis(g.input, layout.past_names(1)[0]) == length_axis(g.output, layout.present_names(1)[0])


def genai_config(config: dict, generation: dict, graph_file: str, share_buffer: bool) -> dict:
    """The genai_config.json dict; `graph_file` is the decoder's path relative to the export dir."""
    geom = layout.cache_geometry(config)
    context = config.get("max_position_embeddings") or 4096
    eos = _ids(generation.get("eos_token_id"), config.get("eos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    search = {key: generation.get(name, default) for name, (key, default) in SEARCH_KEYS.items()}
    search.update(max_length=context, num_return_sequences=1, early_stopping=True, diversity_penalty=0.0,
                  past_present_share_buffer=share_buffer)
    return {
        "model": {
            "type": config["model_type"],
            "bos_token_id": generation.get("bos_token_id", config.get("bos_token_id")),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos[0],
            "vocab_size": config["vocab_size"],
            "context_length": context,
            "decoder": {
                "filename": graph_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": geom.head_dim,
                "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"],
                "num_key_value_heads": geom.kv_heads,
                "num_hidden_layers": geom.layers,
                "inputs": {
                    "input_ids": layout.INPUTS[0],
                    "attention_mask": layout.INPUTS[1],
                    "position_ids": layout.INPUTS[2],
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": layout.LOGITS,
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": search,
    }


def write_genai_config(root: Path, graph: Path) -> Path:
    """Write root/genai_config.json for the decoder `graph` (a file under root)."""
    config = json.loads((root / "config.json").read_text())
    gen_path = root / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    cfg = genai_config(config, generation, graph.relative_to(root).as_posix(), cache_shares_buffer(graph))
    out = root / "genai_config.json"
    out.write_text(json.dumps(cfg, indent=2) + "\n")
    return out
