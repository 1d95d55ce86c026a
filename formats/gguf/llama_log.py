"""Capture libllama's log lines instead of letting them reach stderr.

    with capture_llama_log() as lines:      # used by quantize.py and conformance.py
        llama_cpp.llama_model_quantize(...)

llama-cpp-python's own log filter maps ggml's current log levels wrongly (warnings pass as errors), so
quantizing prints one line per tensor whatever `verbose` says. Capturing keeps the terminal to our progress
bars and lets a failure quote libllama's reason.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        # back to llama-cpp-python's handler (the module keeps it alive)
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
