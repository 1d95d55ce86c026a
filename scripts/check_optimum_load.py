"""Load a lorax ONNX export with optimum's ORTModelForCausalLM and check it decodes like lorax's runner.

    # optimum-onnx needs transformers<4.58, so it lives in its own venv (../shared/DESIGN.md):
    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 "transformers==4.57.*" optimum-onnx==0.1.0 onnxruntime
    /tmp/optimum-venv/bin/python scripts/check_optimum_load.py dist/onnx [--variant int4] [--tokens 32] [--json out.json]

optimum reads the export dir as lorax writes it (formats/onnx/bundle.py): `from_pretrained(dist/onnx)`
finds onnx/model.onnx; another variant is `file_name="model_q4.onnx"` (what --variant passes).
Run from the repository root: lorax's runner (formats/onnx/runner.py) needs only numpy and
onnxruntime, so both decoders run in the same process, on the same prompt ids. Checks, each a
line of output; exit 1 when any fails:
  - transformers 4.x reads config.json with the right rope theta and loads the tokenizer;
  - optimum's greedy `generate` (its own KV-cache handling) gives the same tokens as lorax's runner,
    for each prompt alone and for all prompts in one left-padded batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx_dir", type=Path, help="the export dir (DIR/onnx of `lorax export --onnx`)")
    ap.add_argument("--variant", default="float32", help="float32 | float16 | int8 | int4 (a graph under onnx/)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--prompt", action="append", help="user message (repeatable); default: three built-ins")
    ap.add_argument("--json", type=Path, help="write the tokens and verdicts here")
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig, AutoTokenizer

    from formats.onnx.bundle import export_root, graph_path
    from formats.onnx.runner import ONNXRunner

    d = export_root(args.onnx_dir)
    if d is None:
        raise SystemExit(f"{args.onnx_dir}: not a lorax ONNX export (no onnx/model*.onnx)")
    checks: dict[str, bool] = {}
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, dir {d}")

    raw = json.loads((d / "config.json").read_text())
    want_theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta"))
    cfg = AutoConfig.from_pretrained(d)
    got_theta = getattr(cfg, "rope_theta", None)
    checks["config rope_theta"] = got_theta == want_theta
    print(f"{'ok ' if checks['config rope_theta'] else 'BAD'} config: rope_theta {got_theta} (export: {want_theta})")

    tok = AutoTokenizer.from_pretrained(d)
    print(f"ok  tokenizer: {type(tok).__name__}, chat template {'present' if tok.chat_template else 'MISSING'}")
    checks["chat template"] = bool(tok.chat_template)

    ours = ONNXRunner(d, variant=args.variant)
    kw = {} if args.variant == "float32" else {"file_name": graph_path(d, args.variant).name}
    model = ORTModelForCausalLM.from_pretrained(d, use_cache=True, **kw)
    print(f"ok  optimum loaded {model.model_path if hasattr(model, 'model_path') else kw}")
    prompts = args.prompt or PROMPTS
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ids = [list(i["input_ids"]) if hasattr(i, "keys") else list(i) for i in ids]

    record = {"dir": str(d), "variant": args.variant, "transformers": transformers.__version__, "prompts": []}
    for p, x in zip(prompts, ids, strict=True):
        out = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                             max_new_tokens=args.tokens, do_sample=False)
        theirs = out[0, len(x):].tolist()
        mine = ours.generate(x, args.tokens)
        same = theirs == mine
        checks[f"greedy: {p[:30]}"] = same
        print(f"{'ok ' if same else 'BAD'} greedy {len(theirs)} tokens: {tok.decode(theirs)!r}")
        if not same:
            first = next((i for i, (a, b) in enumerate(zip(theirs, mine, strict=False)) if a != b), None)
            print(f"    optimum {theirs}\n    lorax   {mine}\n    first difference at token {first}")
        record["prompts"].append({"prompt": p, "ids": x, "optimum": theirs, "lorax": mine})

    # One left-padded batch through optimum (its position ids and mask handling) vs lorax's batch.
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(x) for x in ids)
    batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False, pad_token_id=pad)
    eos = ours.stop
    theirs_b = [_until_stop(row[width:].tolist(), eos) for row in out]
    mine_b = ours.generate_batch(ids, args.tokens)
    checks["left-padded batch"] = theirs_b == mine_b
    print(f"{'ok ' if checks['left-padded batch'] else 'BAD'} left-padded batch of {len(ids)}: "
          f"optimum == lorax batch: {theirs_b == mine_b}")
    record["batch"] = {"optimum": theirs_b, "lorax": mine_b}
    record["checks"] = checks
    record["logits_dtype"] = str(np.dtype(ours.cache_dtype))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    failed = [k for k, v in checks.items() if not v]
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")
    return 1 if failed else 0


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    """optimum pads finished rows with pad tokens; cut each row after its first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens


if __name__ == "__main__":
    sys.exit(main())
