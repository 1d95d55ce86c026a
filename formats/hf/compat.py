"""Make the HF files lorax writes readable by transformers 4.x, transformers.js and other clients, and clean.

    from formats.hf.compat import patch_dir
    patch_dir("dist/merged")      # lorax merge / lorax export / lorax import-gguf call it on what they write

Measured (../shared/DESIGN.md): a `config.json` with only `rope_parameters` makes transformers 4.57
fall back to rope_theta 10000 (SmolLM2's is 100000), and `"tokenizer_class": "TokenizersBackend"`
fails to load there. optimum-onnx and many runtimes still run 4.x, so every directory lorax writes
for others to read carries the legacy keys beside the new ones. transformers.js 4.x reads the chat
template only from tokenizer_config.json, while transformers 5 saves it to chat_template.jinja: the
template goes into both. `save_pretrained` also records how the files were *loaded* (is_local,
local_files_only, ...); a shipped file must not tell its next reader to stay offline.
"""

from __future__ import annotations

import json
from pathlib import Path

# tokenizer classes transformers 5 writes that 4.x cannot import -> a name both versions read
LEGACY_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}

# keys that describe how a checkpoint was *loaded*, not the model: never ship them. auto_map points
# at remote code the export does not carry (lorax only exports architectures transformers has built in).
DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "auto_map",
                    "_commit_hash", "transformers_weights")

# from_pretrained's own arguments that save_pretrained writes back into tokenizer_config.json
DROP_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir",
                       "force_download", "proxies", "resume_download", "revision", "subfolder", "token",
                       "use_auth_token", "trust_remote_code", "_from_auto", "_from_pipeline", "auto_map",
                       # the absolute path a SentencePiece tokenizer was converted from: the build machine's
                       "vocab_file")

CHAT_TEMPLATE_FILE = "chat_template.jinja"


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


def clean_tokenizer_config(tok: dict, chat_template: str | None = None) -> dict:
    """Drop load-time keys, use a class name 4.x can import, and carry the chat template inline."""
    tok = {k: v for k, v in tok.items() if k not in DROP_TOKENIZER_KEYS}
    cls = tok.get("tokenizer_class")
    if cls in LEGACY_TOKENIZER_CLASS:
        tok["tokenizer_class"] = LEGACY_TOKENIZER_CLASS[cls]
    if chat_template is not None and not tok.get("chat_template"):
        tok["chat_template"] = chat_template
    return tok


def patch_dir(model_dir: str | Path) -> None:
    """Rewrite config.json and tokenizer_config.json in place with the legacy-compatible, clean keys."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps(legacy_config(cfg), indent=2, sort_keys=True) + "\n")
    tok_path = model_dir / "tokenizer_config.json"
    if tok_path.exists():
        template = model_dir / CHAT_TEMPLATE_FILE
        tok = clean_tokenizer_config(json.loads(tok_path.read_text()),
                                     template.read_text() if template.is_file() else None)
        tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
