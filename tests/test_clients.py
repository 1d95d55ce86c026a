"""The export dirs as shipped, loaded by the clients users run: transformers.js (Node),
onnxruntime-genai and llama-cpp-python's OpenAI server. Each gives the reference's greedy answer.

    pytest tests/test_clients.py        # CI sets LORAX_REQUIRE_CLIENTS=1: a missing client fails, not skips

The model is the tiny random Llama tuned to end its turn (client_helpers.stopping_model), so every
client must also stop on <|im_end|> exactly where transformers does. The reference is transformers'
greedy generation on the HF dir the exports were written from.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from client_helpers import (
    CHATS,
    STOP_CHAT,
    chat_ids,
    genai_generate,
    npm_dir,
    require_clients,
    stopping_model,
)

TOKENS = 16
SCRIPT = Path(__file__).parent / "clients" / "transformers_js.mjs"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return stopping_model(tiny_model_dir, tmp_path_factory.mktemp("clients") / "hf")


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, tuple[list[int], list[int]]]:
    """chat -> (prompt ids, greedy answer ids) from transformers; the stop chat ends on EOS early."""
    from formats.hf.runner import HFRunner

    hf = HFRunner(model_dir)
    ref = {c: (chat_ids(hf.tokenizer, c), hf.generate(chat_ids(hf.tokenizer, c), TOKENS)) for c in CHATS}
    answer = ref[STOP_CHAT][1]
    assert 2 <= len(answer) < TOKENS and answer[-1] == hf.tokenizer.eos_token_id, answer
    assert any(len(a) == TOKENS for _, a in ref.values())  # and one runs to the budget
    return ref


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory) -> dict[str, Path]:
    """A float32 export and an int4 one (which also holds float32), as `lorax export --onnx` writes them."""
    from formats.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("exports")
    return {"float32": export_onnx(model_dir, root / "f32" / "onnx").dir,
            "int4": export_onnx(model_dir, root / "q4" / "onnx", quant="int4").dir}


def _need(what: str, available: bool) -> None:
    if not available:
        if require_clients():
            pytest.fail(f"{what} is missing and LORAX_REQUIRE_CLIENTS=1")
        pytest.skip(f"{what} is not installed")


def test_transformers_js(exports, reference):
    """fp32 from onnx/model.onnx equals transformers; q4 from onnx/model_q4.onnx equals onnxruntime
    on the same file (lorax's runner); the chat template comes from tokenizer_config.json."""
    from formats.onnx.runner import ONNXRunner

    npm = npm_dir()
    _need("npm/node", npm is not None)

    def run(d: Path, dtype: str) -> list[dict]:
        req = {"dir": str(d), "dtype": dtype, "chats": CHATS, "max_new_tokens": TOKENS}
        out = subprocess.run(["node", str(SCRIPT)], input=json.dumps(req), capture_output=True, text=True,
                             env={**os.environ, "LORAX_NPM_DIR": str(npm)}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["results"]

    for chat, got in zip(CHATS, run(exports["float32"], "fp32"), strict=True):
        prompt, answer = reference[chat]
        assert got["prompt_ids"] == prompt, chat
        assert got["tokens"] == answer, chat
    q4 = ONNXRunner(exports["int4"])
    assert q4.variant == "int4"
    for chat, got in zip(CHATS, run(exports["int4"], "q4"), strict=True):
        assert got["tokens"] == q4.generate(reference[chat][0], TOKENS), chat


def test_onnxruntime_genai(exports, reference):
    """genai_config.json as written: the float32 export equals transformers, the int4 one equals
    onnxruntime on model_q4.onnx; both stop on the EOS ids the config lists."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        og = None
    _need("onnxruntime-genai", og is not None)
    from formats.onnx.runner import ONNXRunner

    def generate(model, ids: list[int]) -> list[int]:
        return genai_generate(model, ids, TOKENS)

    f32 = og.Model(str(exports["float32"]))
    tokenizer = og.Tokenizer(f32)
    for chat in CHATS:
        prompt, answer = reference[chat]
        assert list(tokenizer.encode(chat)) == ONNXRunner(exports["float32"]).tokenize(chat, add_special_tokens=False)
        assert generate(f32, prompt) == answer, chat
    q4, runner = og.Model(str(exports["int4"])), ONNXRunner(exports["int4"])
    for chat in CHATS:
        assert generate(q4, reference[chat][0]) == runner.generate(reference[chat][0], TOKENS), chat
