"""Several sequences at once in llama.cpp: one KV stream per sequence, on the model a `Llama` already loaded.

    from formats.gguf.batch import generate_many, Session
    generate_many(llm, [ids_a, ids_b], 16, stop={2})      # == [greedy(ids_a), greedy(ids_b)] (q8_0: bit for bit)
    s = Session(llm, rows=2, cells=256)                   # teacher-forced logits, then decoding from inside them
    s.feed([prompt_a + answer_a, prompt_b + answer_b]); s.keep(0, len(prompt_a)); s.keep(1, len(prompt_b))
    s.feed([[tok_a], [tok_b]])                            # the next step, as if only the prompts had been fed

llama-cpp-python's `Llama` decodes one sequence; the gate decodes 16 prompts, where one decode step of 16
tokens costs about what one token does on a CPU (the weights are read once per step either way). This builds
a second context on the same loaded model with `n_seq_max` sequences, the LoRA adapters of the `Llama`
object set on it too.

Each sequence gets its own KV stream (kv_unified off) and each multi-token feed (a prompt, a teacher-forced
sample) its own llama_decode, as `Llama` computes it; only one-token steps of every sequence share a
llama_decode. The old path, every prompt in one llama_decode over one shared cache, moved the demo q8_0's
first-step logits by up to 1.35 (and 14 on random-token prompts) from decoding each prompt alone; this one
gives q8_0's one-at-a-time logits bit for bit at every step (tests/test_batched_eval.py) and was faster
(2.9 vs 4.2 s, 16 demo prompts). A many-row step itself still rounds differently from a one-row step where
llama.cpp picks another kernel by batch size: f32's sgemm (3.3e-5 on the demo) and the K-quants' repacked
kernels (1.7 on the demo's q4_k_m), in either cache layout.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from formats.errors import FormatError
from formats.runner import greedy_batch

CTX_PAD = 256  # llama.cpp pads every context (and per-sequence context) to a multiple of this many cells
MAX_UBATCH = 512  # tokens per llama_decode: Llama's own n_batch, so a prefill is chunked as it chunks it


def stream_cells(tokens: int) -> int:
    """The cells of one sequence's stream that hold `tokens` (llama.cpp pads a stream to CTX_PAD)."""
    return max(-(-tokens // CTX_PAD), 1) * CTX_PAD


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


def _context(llm, n_seq: int, per_seq: int):
    """A context on `llm`'s model for `n_seq` sequences of `per_seq` cells each, in separate KV streams, with
    llm's settings (threads, KV cache types, LoRA)."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    src = llm.context_params
    for field in ("n_threads", "n_threads_batch", "type_k", "type_v", "flash_attn_type", "offload_kqv"):
        if hasattr(src, field):
            setattr(params, field, getattr(src, field))
    params.n_ctx = per_seq * n_seq
    params.n_batch = params.n_ubatch = min(per_seq, MAX_UBATCH)
    params.n_seq_max = n_seq
    params.kv_unified = False
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if ctx is None:
        raise FormatError(f"llama.cpp could not create a context of {n_seq} sequences x {per_seq} cells")
    if getattr(llm, "_lora_adapter", None):
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
        scales = (ctypes.c_float * 1)(llm.lora_scale)
        if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales):
            llama_cpp.llama_free(ctx)
            raise FormatError("llama.cpp could not set the LoRA adapter on the batch context")
    return ctx


class Session:
    """`rows` sequences of up to `cells` tokens each in one context, every row with its own live prefix (the
    interface of formats.hf.session.CacheSession, which the gate's session_outputs drives)."""

    def __init__(self, llm, rows: int, cells: int) -> None:
        import llama_cpp

        if rows > llama_cpp.llama_max_parallel_sequences():
            raise FormatError(f"{rows} rows exceed llama.cpp's {llama_cpp.llama_max_parallel_sequences()} parallel "
                              "sequences; split the batch")
        self._lc, self.rows, self.cells = llama_cpp, rows, stream_cells(cells)
        self.vocab = llm.n_vocab()
        self.ctx = _context(llm, rows, self.cells)
        self.chunk = min(self.cells, MAX_UBATCH)
        self.batch = _Batch(self.chunk, rows)
        self.live: list[list[int]] = [[] for _ in range(rows)]  # positions of each row's prefix

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Run the entries in chunks of the batch's capacity; the logits of the entries that ask, in order."""
        out = []
        for start in range(0, len(entries), self.chunk):
            part = entries[start:start + self.chunk]
            self.batch.fill(part)
            if self._lc.llama_decode(self.ctx, self.batch.batch) != 0:
                raise FormatError("llama_decode failed on a multi-sequence batch")
            wanted = sum(1 for e in part if e[3])
            if wanted:  # llama.cpp stores the asked-for rows contiguously, in batch order
                ptr = self._lc.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(wanted, self.vocab)).copy())
        return np.concatenate(out) if out else np.zeros((0, self.vocab), np.float32)

    def feed(self, tokens: Sequence[Sequence[int]], every: bool = True) -> list[np.ndarray]:
        """Append `tokens[r]` (any count, zero included) to each row; their logits [len, vocab] per row, or
        only the last position's [1, vocab] when not `every` (a prompt before decoding)."""
        for r, t in enumerate(tokens):
            if len(self.live[r]) + len(t) > self.cells:
                raise FormatError(f"row {r}: {len(self.live[r]) + len(t)} tokens exceed the session's "
                                  f"{self.cells} cells per sequence")
        entries = [[(int(tok), len(self.live[r]) + k, r, every or k == len(t) - 1) for k, tok in enumerate(t)]
                   for r, t in enumerate(tokens)]
        out: list[np.ndarray] = [np.zeros((0, self.vocab), np.float32) for _ in tokens]
        if all(len(e) <= 1 for e in entries):  # one decoding step: every row's token in one llama_decode
            flat = [e[0] for e in entries if e]
            logits = self._decode(flat)
            for k, (_, _, r, _) in enumerate(flat):
                out[r] = logits[k:k + 1]
        else:  # a prefill per row, as a one-sequence context computes it
            for r, e in enumerate(entries):
                if e:
                    out[r] = self._decode(e)
        for r, t in enumerate(tokens):
            self.live[r] += range(len(self.live[r]), len(self.live[r]) + len(t))
        return out

    def keep(self, row: int, n: int) -> None:
        """Rewind `row` to the first `n` tokens of its prefix (its KV cells past them are removed)."""
        if n < len(self.live[row]):
            mem = self._lc.llama_get_memory(self.ctx)
            if not self._lc.llama_memory_seq_rm(mem, row, n, -1):
                raise FormatError(f"llama.cpp could not remove positions >= {n} of sequence {row}")
            self.live[row] = self.live[row][:n]

    def close(self) -> None:
        if self.ctx is not None:
            self.batch.close()
            self._lc.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_many(llm, prompts: list[list[int]], n: int, stop: set[int], seq_cap: int | None = None
                  ) -> list[list[int]]:
    """Up to `n` greedy tokens after each prompt (each cut after its first stop token). `seq_cap`: llama.cpp's
    context per sequence must stay within it (Phi-3 longrope, formats/gguf/runner.py)."""
    if not prompts or any(not p for p in prompts):
        raise FormatError("every prompt of a batch needs at least one token")
    longest = max(len(p) for p in prompts) + n
    if seq_cap and stream_cells(longest) > seq_cap:
        raise FormatError(f"a prompt of {longest - n} tokens plus {n} generated exceeds {seq_cap}, the "
                          "context that keeps llama.cpp on Phi-3's short rope factors")
    with Session(llm, len(prompts), longest) as s:
        def step(toks) -> np.ndarray:
            if toks is None:  # the prompts: each row's last position
                return np.stack([lg[-1] for lg in s.feed(prompts, every=False)])
            return np.stack([lg[-1] for lg in s.feed([[int(t)] for t in toks])])

        return greedy_batch(step, n, len(prompts), stop)
