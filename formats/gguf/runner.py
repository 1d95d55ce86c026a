"""Runner for a GGUF file in llama.cpp (llama-cpp-python), with logits at every position.

    from formats.gguf.runner import GGUFRunner
    with GGUFRunner("dist/model-f32.gguf") as r:
        r.logits(ids)
    GGUFRunner("dist/base-f32.gguf", lora_path="dist/model-lora-f32.gguf")   # base + LoRA adapter GGUF

The KV cache is f32 by default (llama.cpp's own default is f16, which alone moves an exact f32 file by ~0.02
in the logits): the gate measures the file, not the cache setting; `kv_cache="f16"` measures the runtime default.

Phi-3 longrope: llama.cpp applies the long rope factors whenever its context per sequence exceeds the original
context length, transformers only to sequences longer than it. The runner therefore keeps its context (and the
batch's per-sequence context) within that length, so sequences that fit run with the short factors in both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from formats.errors import FormatError
from formats.gguf.batch import CTX_PAD
from formats.gguf.llama_log import capture_llama_log
from formats.runner import greedy_loop

# KV cache precision -> ggml type constant (looked up lazily: llama_cpp is a heavy import)
KV_TYPES = {"f32": lambda m: m.GGML_TYPE_F32, "f16": lambda m: m.GGML_TYPE_F16}


class GGUFRunner:
    def __init__(self, path: str | Path, n_ctx: int = 4096, lora_path: str | Path | None = None,
                 name: str | None = None, n_threads: int | None = None, kv_cache: str = "f32") -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such GGUF file")
        if lora_path is not None and not Path(lora_path).is_file():
            raise FormatError(f"{lora_path}: no such LoRA GGUF file")
        self.name = name or f"gguf:{self.path.name}" + (f"+{Path(lora_path).name}" if lora_path else "")
        self.seq_cap = longrope_context(self.path)
        n_ctx = min(n_ctx, self.seq_cap) if self.seq_cap else n_ctx
        self.n_ctx = n_ctx
        with capture_llama_log() as log:
            try:
                self.llm = Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=min(n_ctx, 512),
                    logits_all=True,  # teacher-forced parity needs every position's logits
                    n_threads=n_threads or os.cpu_count(),
                    lora_path=str(lora_path) if lora_path else None,
                    # llama.cpp's default f16 KV cache adds ~0.02 max |dlogit| (KLD ~1e-6) on its own, enough
                    # to flip near-tied top-1 tokens of an exact f32 file; the gate measures the file, so it
                    # keeps the cache in f32 by default (kv_cache="f16" measures the runtime default).
                    type_k=KV_TYPES[kv_cache](llama_cpp),
                    type_v=KV_TYPES[kv_cache](llama_cpp),
                    verbose=False,
                )
            except ValueError as e:  # llama-cpp-python's message has no reason; libllama logged it
                raise FormatError(f"llama.cpp could not load {self.name}: {_reason(log, str(e))}") from e
            # llama-cpp-python tests a NULL adapter pointer with `is None`, so a LoRA that libllama rejects
            # (wrong base, wrong shapes) would silently leave the base model running: refuse it here
            if lora_path and not self.llm._lora_adapter:
                self.llm.close()
                raise FormatError(f"llama.cpp rejected the LoRA {Path(lora_path).name} for {self.path.name}: "
                                  f"{_reason(log, 'no reason logged')}")
        self.vocab = self.llm.n_vocab()
        self.stop = self._eog_ids()

    def _eog_ids(self) -> set[int]:
        """Every token llama.cpp treats as end-of-generation (eos, eot and the ones it detects by text)."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return {t for t in range(self.vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special=True parses special tokens written in the text, as HF tokenizers do.
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        if len(ids) > self.n_ctx:
            why = " (Phi-3 longrope's original context: see formats/gguf/runner.py)" if self.seq_cap else ""
            raise FormatError(f"{len(ids)} tokens exceed the runner's context of {self.n_ctx}{why}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def generate(self, ids: Sequence[int], n: int) -> list[int]:
        self.llm.reset()

        def step(new: list[int]) -> np.ndarray:
            self.llm.eval(new)
            return np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

        return greedy_loop(step, ids, n, self.stop)

    def logits_batch(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One prefill per row: llama.cpp already runs a row's tokens as one batch (n_batch 512), and the
        logits of every position have to be copied out row by row anyway."""
        return [self.logits(r) for r in rows]

    def generate_batch(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Greedy decoding of every prompt at once, one llama.cpp sequence id per prompt (formats.gguf.batch)."""
        from formats.gguf.batch import generate_many

        return generate_many(self.llm, [list(p) for p in prompts], n, self.stop, seq_cap=self.seq_cap)

    def can_session(self) -> bool:
        """Whether cache_session decodes exactly: not where llama.cpp's context must stay short (Phi-3
        longrope) or its cache is a sliding window (removing positions from it is not exact)."""
        import llama_cpp

        return not self.seq_cap and llama_cpp.llama_model_n_swa(self.llm.model) == 0

    def cache_session(self, rows: int, cells: int):
        """`rows` sequences of up to `cells` tokens on this model, each in its own KV stream: teacher-forced
        logits, then greedy decoding from inside them (formats.gguf.batch.Session), or None where
        can_session() says no."""
        from formats.gguf.batch import Session

        return Session(self.llm, rows, cells) if self.can_session() else None

    def close(self) -> None:
        """Free the model now (llama-cpp-python's finalizer fails if it only runs at interpreter exit)."""
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> GGUFRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def longrope_context(path: Path) -> int | None:
    """The largest context that keeps llama.cpp on the short longrope factors (None: the file has none)."""
    from formats.gguf.header import read_values, tensor_names

    if "rope_factors_long.weight" not in tensor_names(path):
        return None
    arch = read_values(path, {"general.architecture"}).get("general.architecture")
    key = f"{arch}.rope.scaling.original_context_length"
    orig = read_values(path, {key}).get(key)
    return orig // CTX_PAD * CTX_PAD if orig else None


def _reason(log: list[str], default: str) -> str:
    return next((ln.strip() for ln in reversed(log) if "fail" in ln.lower() or "error" in ln.lower()), default)
