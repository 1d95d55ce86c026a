"""Run an exported ONNX decoder in onnxruntime: prefill + incremental decode with the KV cache.

    from formats.onnx.runner import ONNXRunner
    r = ONNXRunner("dist/onnx")        # the primary graph (lorax.json); variant="float32" picks another
    r.logits(ids)                      # teacher-forced [seq, vocab] float32 (the parity gate)
    r.generate(ids, 32)                # greedy, one token per step through the cache
    r.measure_decode(ids, 128)         # tokens/s of cached greedy decoding

Implements the Runner protocol (formats/runner.py) for `lorax check` and the demo. The cache stays
in onnxruntime's OrtValues between steps (IOBinding), so on the CUDA provider it never leaves the
GPU; the CUDA provider is picked when onnxruntime-gpu is installed and a GPU is there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from formats.errors import FormatError
from formats.onnx import layout
from formats.onnx.bundle import resolve_graph
from formats.runner import greedy_batch, greedy_loop

# provider -> the OrtValue device name its outputs live on; first available wins.
PROVIDERS: dict[str, str] = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}

# ONNX tensor type -> numpy dtype of the KV cache the graph takes.
_CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def pick_providers(available: Sequence[str] | None = None) -> list[str]:
    """CUDA first when onnxruntime-gpu offers it (onnxruntime falls back to CPU without a GPU), then CPU."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return [p for p in PROVIDERS if p in available] or ["CPUExecutionProvider"]


@dataclass(frozen=True)
class DecodeSpeed:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens: tuple[int, ...] = ()  # the greedy tokens: the prefill's, then one per decode step

    @property
    def tokens_per_s(self) -> float:
        """Cached decode rate: tokens after the first (which the prefill produced) per decode second."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


class ONNXRunner:
    def __init__(self, model_dir: str | Path, name: str | None = None, threads: int | None = None,
                 providers: Sequence[str] | None = None, variant: str | None = None) -> None:
        import onnxruntime as ort

        # The export dir holds config + tokenizer; its graphs are under onnx/ (formats/onnx/bundle.py).
        self.dir, path, self.variant = resolve_graph(model_dir, variant)
        self.graph = path
        self.name = name or f"onnx:{self.dir.name}" + (f":{self.variant}" if variant else "")
        self.config = json.loads((self.dir / "config.json").read_text())
        self.geom = layout.cache_geometry(self.config)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers or pick_providers()))
        self.provider = self.session.get_providers()[0]
        self.device = PROVIDERS.get(self.provider, "cpu")
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in layout.input_names(self.geom.layers) if n not in inputs]
        if missing:
            raise FormatError(f"{path}: inputs {missing[:3]} missing; not a lorax/optimum decoder with KV cache "
                              f"(re-export with `lorax export --onnx`)")
        self.cache_dtype = _CACHE_DTYPES[inputs["past_key_values.0.key"].type]
        self.stop = self._stop_ids()
        self._tokenizer = None

    # ---- Runner protocol -------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([list(ids)], dtype=np.int64)
        logits, _ = self._forward(ids, np.ones_like(ids), self._empty_cache(1))
        return logits[0].astype(np.float32)

    def generate(self, ids: Sequence[int], n: int, use_cache: bool = True) -> list[int]:
        """Greedy continuation; `use_cache=False` recomputes the whole sequence each step (a reference)."""
        if not use_cache:
            return self._generate_recompute(list(ids), n)
        state = {"cache": self._empty_cache(1), "len": 0}

        def step(new: list[int]) -> np.ndarray:
            x = np.asarray([new], dtype=np.int64)
            state["len"] += len(new)
            logits, state["cache"] = self._forward(x, np.ones((1, state["len"]), np.int64), state["cache"])
            return logits[0, -1].astype(np.float32)

        return greedy_loop(step, ids, n, self.stop)

    def close(self) -> None:
        """Drop the onnxruntime session (its weights) now rather than at garbage collection."""
        self.session = None

    # ---- batches, speed ----------------------------------------------------------------------

    def logits_batch(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Teacher-forced logits of several sequences in one left-padded batch, each [len(row), vocab]."""
        ids, mask = self._left_pad(rows)
        logits, _ = self._forward(ids, mask, self._empty_cache(len(rows)))
        width = ids.shape[1]
        return [logits[i, width - len(r):].astype(np.float32) for i, r in enumerate(rows)]

    def generate_batch(self, rows: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Greedy `n` tokens for each left-padded row, decoding all rows together through the cache."""
        ids, mask = self._left_pad(rows)
        state = {"mask": mask, "cache": self._empty_cache(len(rows))}

        def step(toks) -> np.ndarray:
            x = ids
            if toks is not None:
                x = np.asarray(toks, dtype=np.int64).reshape(-1, 1)
                state["mask"] = np.concatenate([state["mask"], np.ones((len(rows), 1), np.int64)], axis=1)
            logits, state["cache"] = self._forward(x, state["mask"], state["cache"])
            return logits[:, -1]

        return greedy_batch(step, n, len(rows), self.stop)

    def measure_decode(self, ids: Sequence[int], n: int) -> DecodeSpeed:
        """Prefill `ids`, then greedily decode `n` tokens through the cache (no early stop)."""
        x = np.asarray([list(ids)], dtype=np.int64)
        t0 = time.perf_counter()
        logits, cache = self._forward(x, np.ones_like(x), self._empty_cache(1))
        t1 = time.perf_counter()
        total = x.shape[1]
        tokens = []
        for _ in range(n):
            tokens.append(int(logits[0, -1].argmax()))
            total += 1
            logits, cache = self._forward(np.asarray([tokens[-1:]], dtype=np.int64),
                                          np.ones((1, total), np.int64), cache)
        t2 = time.perf_counter()
        tokens.append(int(logits[0, -1].argmax()))
        return DecodeSpeed(x.shape[1], n, t1 - t0, t2 - t1, tuple(tokens))

    # ---- internals ---------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.dir)
        return self._tokenizer

    def _stop_ids(self) -> set[int]:
        gen_path = self.dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        eos = gen.get("eos_token_id", self.config.get("eos_token_id"))
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def _generate_recompute(self, seq: list[int], n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            tok = int(self.logits(seq + out)[-1].argmax())
            out.append(tok)
            if tok in self.stop:
                break
        return out

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        if not rows or any(len(r) == 0 for r in rows):
            raise FormatError("every row of a batch needs at least one token")
        width = max(len(r) for r in rows)
        pad = self.config.get("pad_token_id") or 0
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        return ids, mask

    def _empty_cache(self, batch: int) -> list:
        import onnxruntime as ort

        empty = np.zeros(self.geom.shape(batch, 0), dtype=self.cache_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in range(2 * self.geom.layers)]

    @staticmethod
    def _positions(mask: np.ndarray, past: int) -> np.ndarray:
        """Position ids of the new tokens: real tokens are counted, so a left-padded row starts at 0
        like an unpadded one (optimum and transformers' generate derive them the same way)."""
        return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]

    def _forward(self, ids: np.ndarray, mask: np.ndarray, cache: list) -> tuple[np.ndarray, list]:
        """One graph run: `ids` [batch, new], `mask` [batch, past + new]; returns logits and the new cache."""
        positions = self._positions(mask, past=cache[0].shape()[2])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        for name, value in zip(layout.past_names(self.geom.layers), cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(layout.LOGITS, "cpu")
        for name in layout.present_names(self.geom.layers):
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]
