"""formats.hf.load: a checkpoint loaded in another dtype tensor by tensor gives transformers' own model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from formats.hf.load import checkpoint_dtypes, load_causal_lm


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_load_equals_transformers_own(tiny_model_dir, dtype):
    ours = load_causal_lm(tiny_model_dir, dtype).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype)).eval()
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == getattr(torch, dtype) and torch.equal(a[k], b[k]), k
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    # tied embeddings stay tied, as transformers ties them
    if theirs.get_output_embeddings().weight is theirs.get_input_embeddings().weight:
        assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight


def test_checkpoint_dtypes_reads_the_headers(tiny_model_dir):
    assert checkpoint_dtypes(tiny_model_dir) == {"float32"}
