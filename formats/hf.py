"""Runner for a Hugging Face model directory (merged or base), in torch, float32 by default.

    from formats.hf import HFRunner
    r = HFRunner("merged/"); r.logits(r.tokenize("Hello"))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from formats.runner import greedy_loop


class HFRunner:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", name: str | None = None, model=None,
                 tokenizer=None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or f"hf:{Path(model_dir).name}"
        self.path = Path(model_dir)
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
