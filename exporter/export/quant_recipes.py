"""Which recipe (importance matrix, per-tensor types) each GGUF type gets by default, and the `--quant auto` pool.

    lorax export adapter/ --out dist --gguf --quant q4_k_m        # --imatrix auto: DEFAULTS["q4_k_m"] applies
    lorax export adapter/ --out dist --gguf --quant q4_k_m --imatrix off    # plain libllama, as llama-quantize
    python scripts/bench_quant.py --adapter adapter/ --sweep      # the measurements behind the tables below

Only measured choices live here (docs/QUANT.md has the tables: SmolLM2-135M demo fine-tune, 50 held-out
prompts, vs the merged model). A type is listed in IMATRIX_HELPS only where the matrix lowered mean KLD
on that measurement; types where it did not keep plain libllama under `--imatrix auto`.
"""

from __future__ import annotations

from formats.gguf.imatrix import Imatrix
from formats.gguf.quantize import NEEDS_IMATRIX, Recipe

# tensor classes (GGUF names blk.N.<class>.weight) the sensitivity sweep bumps one at a time
SENSITIVITY_CLASSES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# types where the fine-tune's own matrix lowered mean KLD on the demo (see module doc): q4_k_m, q4_k_s, iq4_xs
# (0.574 -> 0.476); q5_k_m measured worse with it (0.135 -> 0.263). iq3_m was measured only with one, as
# llama-quantize recommends for every i-quant; the low-bit i-quants cannot be made without one
IMATRIX_HELPS = frozenset({"q4_k_m", "q4_k_s", "iq4_xs", "iq3_m"}) | NEEDS_IMATRIX

# per-type tensor overrides lorax adds on top of the matrix (pattern, type), measured to pay for their bytes.
# q4_k_m: of the seven tensor classes bumped one at a time (and five combinations, docs/QUANT.md), ffn_gate
# bought the most: 0.124 -> 0.089 mean KLD for +9.4% bytes on the demo, 0.43x plain q4_k_m. q6_k, not q8_0:
# libllama demotes an override to the type's fallback where rows do not fit 256-blocks, so SmolLM2's
# 576-wide ffn_gate becomes q8_0 (measured: the same file, byte for byte) while a model with 256-multiple
# rows gets q6_k, the type q4_k_m itself gives its sensitive tensors, for ~+9% rather than ~+18% bytes.
OVERRIDES: dict[str, tuple[tuple[str, str], ...]] = {
    "q4_k_m": ((r"\.ffn_gate\.", "q6_k"),),
}


def default_recipe(qtype: str, imx: Imatrix | None) -> Recipe:
    """What `--imatrix auto` makes of `qtype`: the matrix (and measured overrides) where they helped."""
    if imx is None or qtype not in IMATRIX_HELPS:
        return Recipe()
    return Recipe(imatrix=imx, tensor_types=OVERRIDES.get(qtype, ()))


def wants_imatrix(quants: tuple[str, ...] | list[str]) -> bool:
    return any(q in IMATRIX_HELPS for q in quants)


def recipe_label(recipe: Recipe) -> str:
    """What a recipe adds, for tables: "imatrix", "imatrix,ffn_gate=q6_k" (patterns without regex escapes)."""
    parts = ["imatrix"] if recipe.imatrix is not None else []
    return ",".join(parts + [f"{p.replace(chr(92), '').strip('.')}={t}" for p, t in recipe.tensor_types])


def lorax_recipes(imx: Imatrix) -> list:
    """The bench's pool besides plain types: every lossy type with the matrix (and its default overrides)."""
    from exporter.export.quant_auto import Candidate

    recipes = [(q, Recipe(imatrix=imx, tensor_types=OVERRIDES.get(q, ())))
               for q in ("q4_k_m", "q4_k_s", "q5_k_s", "q5_k_m", "q3_k_m", "iq4_xs", "iq3_m", "iq3_xxs", "q6_k")]
    return [Candidate(q, r, recipe_label(r)) for q, r in recipes]


# the sizes --quant auto chooses among (registry rows, lossy, 3-6 bits: q8_0 is the lossless-ish ceiling)
AUTO_TYPES = ("q3_k_m", "q4_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_xs", "iq3_m", "iq3_xxs")
# with a matrix only: plain i-quants of a QLoRA merge measured worse than with one (iq4_xs 0.574 vs 0.476)
MATRIX_ONLY = frozenset({"iq4_xs", "iq3_m"}) | NEEDS_IMATRIX


def auto_pool(imx: Imatrix | None, user: Recipe | None = None) -> list:
    """Candidates of `--quant auto`: each offered type plain and, with a matrix, with it (user overrides on all)."""
    from dataclasses import replace

    from exporter.export.quant_auto import Candidate
    from exporter.gate.registry import offered

    user = user or Recipe()
    offered_types = set(offered("gguf"))
    pool = []
    for q in AUTO_TYPES:
        if q not in offered_types:
            continue
        variants = [] if q in MATRIX_ONLY else [Recipe()]
        if imx is not None:
            variants.append(Recipe(imatrix=imx))
            if q in OVERRIDES:  # the default recipe, and the matrix alone for budgets its extra bytes miss
                variants.append(Recipe(imatrix=imx, tensor_types=OVERRIDES[q]))
        for v in variants:
            label = recipe_label(v)  # before the user's overrides, which every candidate shares
            r = replace(v, tensor_types=user.tensor_types + v.tensor_types,
                        output_type=user.output_type or v.output_type,
                        embedding_type=user.embedding_type or v.embedding_type)
            pool.append(Candidate(q, r, label))
    return pool
