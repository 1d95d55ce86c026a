"""`lorax merge` on the real model (SmolLM2-135M stored in bfloat16), against the trained model.

    pytest -m slow tests/test_merge_smollm2.py -s     # prints the measured table

Measures, on the same token ids, against the PEFT model on the NF4 (+double quant) base:
  exact     the merged float32 model vs the reference loaded in float32 (as lorax trains on CPU)
  floor     the same merged model vs the reference loaded in bfloat16 (transformers' default for a bf16
            checkpoint): the 4-bit weights are identical, but activations round to bf16 between layers,
            so this is the reference's own noise, not merge error. (DESIGN.md's 5.6e-5 came from bnb's
            AVX512-BF16 matmul; this machine has AVX2 only, where a float32 load has no bf16 rounding.)
  shipped   the default output (bfloat16 weights, the base's storage dtype) vs the float32 reference
  naive     the adapter folded into the original (unquantized) weights vs the float32 reference
"""

from __future__ import annotations

import pytest
import torch
from adapters import LoraSpec, logits, make_adapter

from exporter.gate.metrics import compare
from exporter.merge.api import MergeOptions, merge_adapter

pytestmark = pytest.mark.slow

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from wine making. Within fifty years, "
    "presses were running in more than two hundred cities across Europe, and the price of books fell sharply.",
    "To make a simple tomato sauce, warm olive oil in a pan, add chopped garlic and cook it gently until "
    "it smells sweet. Pour in the tomatoes, season with salt, and let the sauce simmer for twenty minutes.",
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
    "    return out + a + b\n",
]


@pytest.fixture(scope="module")
def bf16_base(smollm2_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2") / "bf16"
    AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out)
    return out


def test_merge_smollm2_exact_floor_and_naive(bf16_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.gate.reference import load_reference, read_adapter

    tok = AutoTokenizer.from_pretrained(bf16_base)
    ids = [list(tok(t)["input_ids"]) for t in TEXTS]
    ref32 = logits(make_adapter(bf16_base, tmp_path / "ad", "nf4", double_quant=True, spec=LoraSpec(r=16, alpha=32, std=0.02, load_dtype="float32")), ids)
    info = read_adapter(tmp_path / "ad")
    ref16 = logits(load_reference(info, dtype="bfloat16")[0], ids)

    def merged(name, **kw):
        out = merge_adapter(tmp_path / "ad", tmp_path / name, MergeOptions(progress=False, **kw))
        return logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)

    m32 = merged("m32", dtype="float32")
    rows = {
        "exact (merged f32 vs reference f32)": compare(ref32, m32, ids),
        "floor (merged f32 vs reference bf16)": compare(ref16, m32, ids),
        "shipped (merged bf16 vs reference f32)": compare(ref32, merged("m16"), ids),
        "naive (original weights vs reference f32)": compare(ref32, merged("naive", merge_base="original",
                                                                          dtype="float32"), ids),
    }
    print(f"\nSmolLM2-135M (bf16 base), NF4+dq, rank 16 all-linear, {rows['exact (merged f32 vs reference f32)'].positions} positions")
    for name, p in rows.items():
        print(f"  {name:44s} mean KLD {p.kld_mean:.2e}  p99 {p.kld_p99:.2e}  top-1 {p.top1:.2%}  "
              f"max|dlogit| {p.max_abs_logit:.3g}")
    exact, floor, shipped, naive = rows.values()
    # The merge reproduces the trained model far below the reference's own bf16 noise...
    assert exact.kld_mean < floor.kld_mean / 100 and exact.top1 >= 0.995, exact
    # ...and folding into the original weights is a different model, an order of magnitude further away
    # than even the bf16-loaded reference is from itself.
    assert naive.kld_mean > 10 * floor.kld_mean and naive.top1 < floor.top1, naive
    assert shipped.kld_mean < naive.kld_mean / 10, shipped
