"""Quant section of `make bench`: per type, plain libllama vs lorax's recipe at the same size, in one run.

    python scripts/bench_quant.py --adapter /work/demo-run/adapter --merged /work/demo-run/dist/merged
    python scripts/bench_quant.py --adapter adapter/ --sweep        # + per-tensor-class sensitivity (q8_0 bumps)
    python scripts/bench_quant.py --only --try q4_k_m:ffn_gate=q8_0,embd=q5_0   # plain, default and these recipes

Everything is measured against the merged model (float32, torch) on the adapter's held-out eval.jsonl:
mean KLD, top-1, greedy match and task accuracy (exact answers), with file bytes. "plain" is what
`llama-quantize` makes with no options; "imatrix" adds the importance matrix from the fine-tune's own
training rows (exporter.export.calibration); "+..." adds per-tensor types. The original base's own q4_k_m loss
(its q4_k_m vs itself) is the moonshot line. Without --merged the adapter is merged first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.export.quant_auto import Candidate, measure  # noqa: E402
from exporter.gate.evaluate import Yardstick  # noqa: E402
from formats.gguf.quantize import Recipe  # noqa: E402


def reference(model_dir: Path, yard: Yardstick):
    from exporter.gate.evaluate import run_reference
    from formats.hf.runner import HFRunner

    ref = HFRunner(model_dir, name=f"reference:{model_dir.name}")
    try:
        return run_reference(ref, yard)
    finally:
        ref.close()


def intermediate(hf_dir: Path, work: Path, stem: str) -> Path:
    from formats.gguf.export import GGUFOptions, export_gguf
    from formats.gguf.writer import source_type

    return export_gguf(hf_dir, work, [source_type(hf_dir)], GGUFOptions(stem=stem, check_tokenizer=False, progress=False,
                       force=True)).files[0].path


def tried(spec: str, imx) -> Candidate:
    """`TYPE:CLASS=TYPE,...,embd=TYPE` -> the type with the matrix and those overrides (classes as --sweep names
    them: attn_q, ffn_gate, ...; `embd`/`output` set the embedding/output tensor types)."""
    qtype, _, rest = spec.partition(":")
    pairs = [p.split("=", 1) for p in rest.split(",") if p]
    special = {k: v for k, v in pairs if k in ("embd", "output")}
    overrides = tuple((rf"\.{k}\.", v) for k, v in pairs if k not in special)
    return Candidate(qtype, Recipe(imatrix=imx, tensor_types=overrides, embedding_type=special.get("embd"),
                                   output_type=special.get("output")), "imatrix," + rest if rest else "imatrix")


def candidates(imx, sweep: bool, tries: list[str], only: bool) -> list[Candidate]:
    from exporter.export.quant_recipes import SENSITIVITY_CLASSES, default_recipe, lorax_recipes

    if only:  # the comparison: plain q4_k_m, lorax's default for it, and the recipes asked for
        return [Candidate("q4_k_m"), Candidate("q4_k_m", default_recipe("q4_k_m", imx), "lorax default"),
                *(tried(t, imx) for t in tries)]
    out = [Candidate("q4_k_m"), Candidate("q4_k_s"), Candidate("q5_k_s"), Candidate("q5_k_m"),
           Candidate("iq4_xs"), Candidate("q3_k_m")]
    out += [Candidate(c.qtype, c.recipe, c.label) for c in lorax_recipes(imx)]
    out += [tried(t, imx) for t in tries]
    if sweep:  # which tensors of a QLoRA merge deserve more bits: each class at q8_0 on top of q4_k_m+imatrix
        out += [Candidate("q4_k_m", Recipe(imatrix=imx, tensor_types=((rf"\.{cls}\.", "q8_0"),)),
                          f"imatrix,{cls}=q8_0") for cls in SENSITIVITY_CLASSES]
        out += [Candidate("q4_k_m", Recipe(imatrix=imx, embedding_type=t), f"imatrix,embd={t}")
                for t in ("q5_0", "q4_0")]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, default=ROOT / "out" / "demo" / "adapter", help="default: make demo's")
    ap.add_argument("--merged", type=Path, help="the merged HF dir (default: the demo's dist/merged next to the "
                    "adapter, else merge the adapter here)")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--imatrix-tokens", type=int, default=32768)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--try", dest="tries", action="append", default=[], metavar="TYPE:CLASS=TYPE,...",
                    help="one more recipe on the matrix, e.g. q4_k_m:ffn_gate=q8_0,embd=q5_0 (repeatable)")
    ap.add_argument("--only", action="store_true", help="measure plain q4_k_m, lorax's default and --try only")
    ap.add_argument("--no-base", action="store_true", help="skip the original base's own q4_k_m line")
    ap.add_argument("--base-types", default="q4_k_m", metavar="T,T", help="types of the original base measured "
                    "against itself (i-quants with a matrix from the same training rows on the base)")
    ap.add_argument("--json", type=Path, help="write every row here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from exporter.export.calibration import calibration_sequences
    from exporter.gate.samples import build, load_rows
    from formats.gguf.imatrix import collect_imatrix

    work = Path(tempfile.mkdtemp(prefix="lorax-bench-quant-"))
    t0 = time.perf_counter()
    merged = args.merged
    if merged is None and (args.adapter.parent / "dist" / "merged" / "config.json").is_file():
        merged = args.adapter.parent / "dist" / "merged"
    if merged is None:
        from exporter.merge.api import MergeOptions, merge_adapter

        merged = merge_adapter(args.adapter, work / "merged", MergeOptions(verify=False, progress=False))
    tok = AutoTokenizer.from_pretrained(merged)
    rows, where = load_rows(None, args.adapter)
    samples = build(rows, tok, max_samples=args.max_samples)
    yard = Yardstick(samples, tok, args.gen_tokens)
    ref = reference(merged, yard)
    t_ref = time.perf_counter()
    cal = calibration_sequences(args.adapter, tok)
    imx = collect_imatrix(merged, cal.sequences, token_budget=args.imatrix_tokens, datasets=[cal.source])
    t_imx = time.perf_counter()
    inter = intermediate(merged, work, "merged")
    rows_out = [m.row() for m in measure(candidates(imx, args.sweep, args.tries, args.only), inter, work, yard, ref)]
    if not args.no_base:  # the moonshot: what q4_k_m costs the original base, measured against itself
        from exporter.gate.reference import read_adapter

        base = read_adapter(args.adapter).base_dir
        bref = reference(base, yard)
        types = args.base_types.split(",")
        bimx = collect_imatrix(base, cal.sequences, token_budget=args.imatrix_tokens, datasets=[cal.source]) \
            if any(t.startswith("iq") for t in types) else None
        cands = [Candidate(t, Recipe(imatrix=bimx) if t.startswith("iq") else Recipe()) for t in types]
        for m in measure(cands, intermediate(base, work, "base"), work, yard, bref):
            rows_out.append({**m.row(), "name": f"original base {m.candidate.qtype} vs itself"})
    print(f"{len(samples)} held-out samples ({where}), {sum(len(s.ids) for s in samples)} tokens; reference "
          f"{t_ref - t0:.0f} s; imatrix {imx.tokens} tokens of {cal.rows} training rows in {t_imx - t_ref:.0f} s")
    ref_bytes = next(r["bytes"] for r in rows_out if r["name"] == "q4_k_m")
    ref_kld = next(r["kld_mean"] for r in rows_out if r["name"] == "q4_k_m")
    print(f"{'candidate':44s} {'bytes':>11s} {'x q4_k_m':>8s} {'mean KLD':>9s} {'x q4_k_m':>8s} {'top-1':>6s} "
          f"{'task':>5s}")
    for r in sorted(rows_out, key=lambda r: r["bytes"]):
        acc = r.get("task_accuracy")
        print(f"{r['name']:44s} {r['bytes']:11,d} {r['bytes'] / ref_bytes:8.3f} {r['kld_mean']:9.4f} "
              f"{r['kld_mean'] / ref_kld:8.3f} {r['top1']:6.1%} {'-' if acc is None else f'{acc:.0%}':>5s}")
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=2) + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
