"""Runner for a Hugging Face model directory (merged or base), in torch, float32 by default.

    from formats.hf.runner import HFRunner
    r = HFRunner("merged/"); r.logits(r.tokenize("Hello"))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from formats.runner import greedy_loop
from lorax_common.files import check_tokenizer_files, read_json_object, weight_files


class HFRunner:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", name: str | None = None, model=None,
                 tokenizer=None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or f"hf:{Path(model_dir).name}"
        self.path = Path(model_dir)
        if tokenizer is None:
            check_tokenizer_files(self.path)  # the error names the broken file, not a bare JSONDecodeError
        if model is None:
            read_json_object(self.path / "config.json", "a Hugging Face model config")
            weight_files(self.path)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
        self.model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        self._torch = torch
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.stop = set(eos if isinstance(eos, list) else [eos]) - {None}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)]))
        return out.logits[0].float().numpy()

    def generate(self, ids: Sequence[int], n: int) -> list[int]:
        torch = self._torch
        state: dict = {"past": None}

        def step(new: list[int]) -> np.ndarray:
            with torch.inference_mode():
                # transformers 5 names the KV cache `cache` (past_key_values is deprecated)
                out = self.model(input_ids=torch.tensor([new]), cache=state["past"], use_cache=True)
            state["past"] = out.cache
            return out.logits[0, -1].float().numpy()

        return greedy_loop(step, ids, n, self.stop)

    def close(self) -> None:
        self.model = None

    def __enter__(self) -> HFRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate_batch(self, prompts: Sequence[Sequence[int]], n: int, batch_size: int = 16) -> list[list[int]]:
        """Greedy continuations of many prompts at once (left-padded); each cut after its first stop token."""
        torch = self._torch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop)
        outs: list[list[int]] = []
        for i in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[i:i + batch_size]]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                          pad_token_id=pad, eos_token_id=sorted(self.stop))
            for row in gen[:, width:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in self.stop), len(row))
                outs.append(row[:cut])
        return outs
