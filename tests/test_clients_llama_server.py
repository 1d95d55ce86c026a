"""llama-cpp-python's OpenAI-compatible server on a lorax GGUF, as the demo prints it:

    python -m llama_cpp.server --model dist/model-q4_k_m.gguf

answers one chat request on 127.0.0.1 with the reference's greedy answer and stops on the model's
end-of-turn token (finish_reason "stop"), using the chat template and EOS lorax wrote into the GGUF.
The model is the tiny random Llama tuned to end its turn (client_helpers.stopping_model), in f32.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from client_helpers import CHATS, STOP_CHAT, chat_ids, require_clients, stopping_model

TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    try:
        import uvicorn  # noqa: F401  (what `llama_cpp.server` needs besides llama_cpp: the [server] extra)
    except ImportError:
        if require_clients():
            pytest.fail("llama-cpp-python[server] is missing and LORAX_REQUIRE_CLIENTS=1")
        pytest.skip("llama-cpp-python[server] is not installed")
    from formats.gguf.export import GGUFOptions, export_gguf

    work = tmp_path_factory.mktemp("server")
    hf = stopping_model(tiny_model_dir, work / "hf")
    gguf = export_gguf(hf, work, ["f32"], GGUFOptions(progress=False)).files[0].path
    port = _free_port()
    log = (work / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "512", "--n_threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{(work / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("server did not answer within 60 s")
        yield url, hf
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_chat_completion_equals_reference_and_stops(server):
    from formats.hf.runner import HFRunner

    url, hf_dir = server
    hf = HFRunner(hf_dir)
    eos = hf.tokenizer.eos_token_id
    for chat in CHATS:
        answer = hf.generate(chat_ids(hf.tokenizer, chat), TOKENS)
        # temperature 0 is greedy; llama-cpp-python's server defaults repeat_penalty to 1.1, which
        # `generate` does not apply: ask for 1.0 so both decode the same distribution.
        reply = _post(url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": chat}], "max_tokens": TOKENS, "temperature": 0,
            "repeat_penalty": 1.0, "seed": 0})
        choice = reply["choices"][0]
        stopped = answer[-1] == eos
        assert choice["finish_reason"] == ("stop" if stopped else "length"), (chat, choice, answer)
        # A random model emits byte tokens that are not whole UTF-8 characters: transformers decodes
        # each to U+FFFD, llama-cpp-python drops them (errors="ignore"); the same ids either way.
        want = hf.tokenizer.decode(answer[:-1] if stopped else answer, skip_special_tokens=True).replace("\ufffd", "")
        assert choice["message"]["content"] == want, chat
        if chat == STOP_CHAT:
            assert stopped and reply["usage"]["completion_tokens"] in (len(answer), len(answer) - 1)
