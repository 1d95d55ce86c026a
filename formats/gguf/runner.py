"""Runner for a GGUF file in llama.cpp (llama-cpp-python), with logits at every position.

    from formats.gguf.runner import GGUFRunner
    r = GGUFRunner("dist/model-f32.gguf"); r.logits(ids)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from formats.errors import FormatError
from formats.runner import greedy_loop


class GGUFRunner:
    def __init__(self, path: str | Path, n_ctx: int = 4096, lora_path: str | Path | None = None,
                 name: str | None = None, n_threads: int | None = None) -> None:
        from llama_cpp import Llama

        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such GGUF file")
        self.name = name or f"gguf:{self.path.name}"
        self.n_ctx = n_ctx
        self.llm = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            logits_all=True,  # teacher-forced parity needs every position's logits
            n_threads=n_threads or os.cpu_count(),
            lora_path=str(lora_path) if lora_path else None,
            verbose=False,
        )
        self.vocab = self.llm.n_vocab()
        self.stop = {t for t in range(self.vocab) if self._is_eog(t)} if self.vocab <= 512 else self._eog_ids()

    def _is_eog(self, tok: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab_ptr(), tok))

    def _vocab_ptr(self):
        import llama_cpp

        return llama_cpp.llama_model_get_vocab(self.llm.model)

    def _eog_ids(self) -> set[int]:
        ids = {self.llm.token_eos()}
        eot = getattr(self.llm, "token_eot", None)
        return ids | ({eot()} if callable(eot) and eot() >= 0 else set())

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special=True parses special tokens written in the text, as HF tokenizers do.
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        if len(ids) > self.n_ctx:
            raise FormatError(f"{len(ids)} tokens exceed the runner's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def generate(self, ids: Sequence[int], n: int) -> list[int]:
        self.llm.reset()

        def step(new: list[int]) -> np.ndarray:
            self.llm.eval(new)
            return np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

        return greedy_loop(step, ids, n, self.stop)
