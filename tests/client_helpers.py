"""Shared by tests/test_clients*.py: a tiny model that ends its turn, chat ids, the transformers.js install.

    from client_helpers import stopping_model, chat_ids, npm_dir
    d = stopping_model(tiny_model_dir, tmp / "stops", "Hello")   # greedy emits <|im_end|> within a few tokens

A random tiny model almost never samples its end-of-turn token, so a client that ignored it would pass
unnoticed; `stopping_model` raises the end-of-turn logit to just above the token the model would pick
a few steps into a chat, so the reference answer provably ends there and every client must stop too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

# transformers.js version the client tests pin (package.json of the test-local npm folder).
TRANSFORMERS_JS = "4.3.2"
CHATS = ["What color is the train loss?", "Hello world!", "The model merge export token layer."]
STOP_CHAT, STOP_STEP = CHATS[0], 4


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def stopping_model(src: Path, dest: Path, chat: str = STOP_CHAT, step: int = STOP_STEP) -> Path:
    """Copy of the tiny model at `src` whose greedy answer to `chat` ends with its EOS by `step` + 1."""
    from safetensors.torch import load_file, save_file

    from formats.hf.runner import HFRunner

    shutil.copytree(src, dest)
    hf = HFRunner(dest)
    eos = hf.tokenizer.eos_token_id
    x = hf.generate(chat_ids(hf.tokenizer, chat), step + 1)[step]
    weights = load_file(dest / "model.safetensors")
    # 1.05 x the row of the token that wins at `step`: the EOS logit beats it there (the winning logit
    # of a wide random init is positive), and wherever else it comes within 5% of the top.
    weights["lm_head.weight"][eos] = weights["lm_head.weight"][x] * 1.05
    save_file({k: v.contiguous() for k, v in weights.items()}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def npm_dir() -> Path | None:
    """A folder with @huggingface/transformers installed (cached under ~/.cache/lorax/npm), or None
    when npm is missing. Install: `ONNXRUNTIME_NODE_INSTALL=skip npm install` -- the CPU binaries of
    onnxruntime-node ship inside the package, its postinstall would only fetch GPU ones."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        return None
    from lorax_common.cache import cache_dir

    d = cache_dir() / "npm" / f"transformers-js-{TRANSFORMERS_JS}"
    installed = d / "node_modules" / "@huggingface" / "transformers" / "package.json"
    if installed.is_file() and json.loads(installed.read_text())["version"] == TRANSFORMERS_JS:
        return d
    d.mkdir(parents=True, exist_ok=True)
    (d / "package.json").write_text(json.dumps({"name": "lorax-client-tests", "private": True}) + "\n")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"@huggingface/transformers@{TRANSFORMERS_JS}"],
                   cwd=d, check=True, env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"},
                   capture_output=True, text=True, timeout=900)
    return d


def require_clients() -> bool:
    """CI sets LORAX_REQUIRE_CLIENTS=1: there a missing client fails the test instead of skipping it."""
    return os.environ.get("LORAX_REQUIRE_CLIENTS") == "1"


def genai_generate(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's `model` (an og.Model) after `ids`: at most `n`, fewer when it
    stops on an EOS id of genai_config.json."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([ids])
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
