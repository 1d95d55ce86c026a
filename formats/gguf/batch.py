"""Greedy decoding of several prompts at once in llama.cpp: one sequence id per prompt, one shared KV cache.

    from formats.gguf.batch import generate_many
    generate_many(llm, [ids_a, ids_b], 16, stop={2})      # == [greedy(ids_a), greedy(ids_b)]

llama-cpp-python's `Llama` decodes one sequence; the gate decodes 16 prompts, where one decode step of 16
tokens costs about what one token does on a CPU (the weights are read once per step either way). This builds
a second context on the same loaded model with `n_seq_max` sequences and a unified KV cache, the LoRA
adapters of the `Llama` object set on it too, and feeds each step's tokens as one llama_batch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from formats.errors import FormatError
from formats.runner import greedy_batch

CTX_PAD = 256  # llama.cpp pads every context (and per-sequence context) to a multiple of this many cells


class _Batch:
    """A llama_batch owned here (freed on close), filled token by token."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, n_seq_max)

    def fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence id, wants logits) per entry."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq

    def close(self) -> None:
        if self.batch is not None:
            self._lc.llama_batch_free(self.batch)
            self.batch = None


def _context(llm, n_seq: int, n_ctx: int, unified: bool = True):
    """A context on `llm`'s model for `n_seq` sequences sharing `n_ctx` cache cells (or n_ctx / n_seq each when
    not `unified`), with llm's settings."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    src = llm.context_params
    for field in ("n_threads", "n_threads_batch", "type_k", "type_v", "flash_attn_type", "offload_kqv"):
        if hasattr(src, field):
            setattr(params, field, getattr(src, field))
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = min(n_ctx, 512)
    params.n_seq_max = n_seq
    params.kv_unified = unified
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if ctx is None:
        raise FormatError(f"llama.cpp could not create a {n_seq}-sequence context of {n_ctx} cells")
    if getattr(llm, "_lora_adapter", None):
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
        scales = (ctypes.c_float * 1)(llm.lora_scale)
        if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales):
            llama_cpp.llama_free(ctx)
            raise FormatError("llama.cpp could not set the LoRA adapter on the batch context")
    return ctx


def generate_many(llm, prompts: list[list[int]], n: int, stop: set[int], seq_cap: int | None = None
                  ) -> list[list[int]]:
    """Up to `n` greedy tokens after each prompt (each cut after its first stop token). `seq_cap`: llama.cpp's
    context per sequence must stay within it (Phi-3 longrope, formats/gguf/runner.py), so each sequence gets
    its own cells instead of one shared cache."""
    import llama_cpp

    if not prompts or any(not p for p in prompts):
        raise FormatError("every prompt of a batch needs at least one token")
    if len(prompts) > llama_cpp.llama_max_parallel_sequences():
        raise FormatError(f"{len(prompts)} prompts exceed llama.cpp's {llama_cpp.llama_max_parallel_sequences()} "
                          "parallel sequences; split the batch")
    n_ctx = sum(len(p) + n for p in prompts) + 16
    n_vocab = llm.n_vocab()
    if seq_cap:
        per_seq = -(-(max(len(p) for p in prompts) + n) // CTX_PAD) * CTX_PAD  # llama.cpp pads to CTX_PAD
        if per_seq > seq_cap:
            raise FormatError(f"a prompt of {max(len(p) for p in prompts)} tokens plus {n} generated exceeds "
                              f"{seq_cap}, the context that keeps llama.cpp on Phi-3's short rope factors")
        ctx = _context(llm, len(prompts), per_seq * len(prompts), unified=False)
    else:
        ctx = _context(llm, len(prompts), n_ctx)
    chunk = min(n_ctx, 512)
    batch = _Batch(chunk, len(prompts))
    lengths = [len(p) for p in prompts]

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Run the entries in chunks of the batch's capacity; logits of the ones that asked, in order."""
        out = []
        for start in range(0, len(entries), chunk):
            part = entries[start:start + chunk]
            batch.fill(part)
            if llama_cpp.llama_decode(ctx, batch.batch) != 0:
                raise FormatError("llama_decode failed on a multi-sequence batch")
            for i, e in enumerate(part):
                if e[3]:
                    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
                    out.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32))
        return out

    def step(toks) -> np.ndarray:
        if toks is None:  # the prompts, each row's last position asks for logits
            entries = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        else:
            entries = [(int(t), lengths[s], s, True) for s, t in enumerate(toks)]
            for s in range(len(prompts)):
                lengths[s] += 1
        return np.stack(decode(entries))

    try:
        return greedy_batch(step, n, len(prompts), stop)
    finally:
        batch.close()
        llama_cpp.llama_free(ctx)
