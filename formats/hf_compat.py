"""Make HF files written by transformers 5 readable by transformers 4.x too.

Measured (../shared/DESIGN.md): a `config.json` with only `rope_parameters` makes transformers 4.57
fall back to rope_theta 10000 (SmolLM2's is 100000), and `"tokenizer_class": "TokenizersBackend"`
fails to load there. optimum-onnx and many runtimes still run 4.x, so every directory lorax writes
for others to read carries the legacy keys beside the new ones.
"""

from __future__ import annotations

import json
from pathlib import Path

# tokenizer classes transformers 5 writes that 4.x cannot import -> a name both versions read
LEGACY_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}

# keys that describe how a checkpoint was *loaded*, not the model: never ship them
DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def legacy_config(cfg: dict) -> dict:
    """Return `cfg` with legacy rope keys added and load-time keys removed."""
    cfg = {k: v for k, v in cfg.items() if k not in DROP_CONFIG_KEYS}
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            scaling.setdefault("type", scaling["rope_type"])
            cfg.setdefault("rope_scaling", scaling)
        else:
            cfg.setdefault("rope_scaling", None)
    return cfg


def patch_dir(model_dir: str | Path) -> None:
    """Rewrite config.json and tokenizer_config.json in place with the legacy-compatible keys."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps(legacy_config(cfg), indent=2, sort_keys=True) + "\n")
    tok_path = model_dir / "tokenizer_config.json"
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        cls = tok.get("tokenizer_class")
        if cls in LEGACY_TOKENIZER_CLASS:
            tok["tokenizer_class"] = LEGACY_TOKENIZER_CLASS[cls]
            tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
