"""GGUF causal LM -> Hugging Face model directory that `lorax train` can use.

    lorax import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ~/.cache/lorax/smollm2

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`) and dequantizes the weights, but the
model it returns carries a GGUF quantization config and cannot be saved as is: rebuild a plain model
from its config, load the dequantized state dict, and save that. Weights are stored in float32 by
default because the dequantized values (d*q + m) are not representable in bf16: float32 keeps them
exact, so the imported model *is* the GGUF model.
"""

from __future__ import annotations

import json
from pathlib import Path

from formats.fsutil import atomic_dir
from formats.gguf.inspect import IMPORTABLE_ARCHS, inspect_gguf
from formats.hf.compat import patch_dir
from lorax_common.hashing import sha256_file
from lorax_common.outputs import refuse_overlap

DTYPES = ("float32", "bfloat16", "float16")
# Bump when the import output changes, so cached imports (scripts/default_model.py) are redone.
IMPORTER_VERSION = 2

# llama.cpp pre-tokenizer name (tokenizer.ggml.pre) -> the HF pre-tokenizer that splits text the same way.
# transformers' GGUF reader builds a plain byte-level pre-tokenizer for every BPE vocab, which drops
# e.g. SmolLM2's single-digit split; restore it so the HF tokenizer is the GGUF's tokenizer.
PRE_TOKENIZERS: dict[str, list[tuple[str, dict]]] = {
    "smollm": [("Digits", {"individual_digits": True}),
               ("ByteLevel", {"add_prefix_space": False, "trim_offsets": True, "use_regex": True})],
}


def _restore_pre_tokenizer(tokenizer, pre_name: str | None) -> None:
    if pre_name not in PRE_TOKENIZERS:
        return
    from tokenizers import pre_tokenizers

    steps = [getattr(pre_tokenizers, cls)(**kw) for cls, kw in PRE_TOKENIZERS[pre_name]]
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = inspect_gguf(gguf_path, IMPORTABLE_ARCHS)
    out_dir = Path(out_dir)
    refuse_overlap(out_dir, [info.path])  # `--out dir/ --force` next to dir/m.gguf would delete the source
    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(info.path.parent), info.path.name

    with atomic_dir(out_dir, force=force) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        _restore_pre_tokenizer(tokenizer, info.pre_tokenizer)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied lm_head is legitimately absent from a GGUF; anything else is a real gap.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"GGUF import mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.generation_config = loaded.generation_config
        del loaded
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        patch_dir(tmp)
        (tmp / "lorax.json").write_text(json.dumps({
            "kind": "import-gguf",
            "importer_version": IMPORTER_VERSION,
            "source": str(info.path.resolve()),
            "source_sha256": sha256_file(info.path),
            "source_file_type": info.file_type,
            "architecture": info.arch,
            "dtype": dtype,
        }, indent=2) + "\n")
    return out_dir
