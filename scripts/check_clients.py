"""Greedy answers of the held-out prompts in the clients people ship ONNX to, against the trained model's.

    python scripts/check_clients.py out/demo/dist --prompts out/demo/data/eval.jsonl [--limit 50] [--tokens 48]
    python scripts/check_clients.py DIST --prompts P.jsonl --optimum-json opt.json   # + optimum's tokens
           # (made by scripts/check_optimum_load.py in its own venv: --json opt.json --prompt ... per prompt)

The reference is transformers' greedy decode of DIST/merged (the trained model: the exact merge equals the
PEFT model to ~1e-11 in KLD). Each client loads DIST/onnx exactly as `lorax export` wrote it:
  - transformers.js (Node, tests/clients/transformers_js.mjs), dtype fp32 (onnx/model.onnx) and, when the
    export has it, q4 (onnx/model_q4.onnx);
  - onnxruntime-genai, through genai_config.json (which names the primary graph);
  - lorax's own onnxruntime runner on each graph, the yardstick for "the client computes what the file says".
A prompt matches when the answer equals the reference token for token up to and including its end-of-turn
token (or `--tokens` tokens). Prints one row per client x graph: vs the reference, and vs lorax's runner on
the same graph. Needs npm/node for transformers.js (skipped with a note when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def user_prompts(path: Path, limit: int) -> list[str]:
    """The first user message of each JSONL row (the chat form lorax train reads)."""
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        msgs = row.get("messages") or [{"role": "user", "content": row.get("prompt", "")}]
        out.append(next(m["content"] for m in msgs if m["role"] == "user"))
    return out[:limit]


def until_stop(tokens: list[int], stop: set[int], n: int) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens[:n]


def transformers_js(onnx_dir: Path, dtype: str, prompts: list[str], n: int) -> list[list[int]] | None:
    from client_helpers import npm_dir

    npm = npm_dir()
    if npm is None:
        return None
    req = {"dir": str(onnx_dir), "dtype": dtype, "chats": prompts, "max_new_tokens": n}
    out = subprocess.run(["node", str(ROOT / "tests" / "clients" / "transformers_js.mjs")], input=json.dumps(req),
                         capture_output=True, text=True, env={**os.environ, "LORAX_NPM_DIR": str(npm)}, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"transformers.js failed:\n{out.stderr[-3000:]}")
    return [r["tokens"] for r in json.loads(out.stdout.strip().splitlines()[-1])["results"]]


def genai(onnx_dir: Path, prompt_ids: list[list[int]], n: int) -> list[list[int]]:
    import onnxruntime_genai as og
    from client_helpers import genai_generate

    model = og.Model(str(onnx_dir))
    return [genai_generate(model, ids, n) for ids in prompt_ids]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dist", type=Path, help="a `lorax export --onnx` output dir (holds merged/ and onnx/)")
    ap.add_argument("--prompts", type=Path, required=True, help="held-out JSONL (chat rows)")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--optimum-json", type=Path, action="append", default=[],
                    help="scripts/check_optimum_load.py --json output(s) for these prompts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from client_helpers import chat_ids

    from formats.hf.runner import HFRunner
    from formats.onnx.bundle import primary_variant, variants_in
    from formats.onnx.runner import ONNXRunner

    onnx_dir = args.dist / "onnx"
    prompts = user_prompts(args.prompts, args.limit)
    hf = HFRunner(args.dist / "merged")
    stop = {hf.tokenizer.eos_token_id}
    ids = [chat_ids(hf.tokenizer, p) for p in prompts]
    ref = [until_stop(hf.generate(x, args.tokens), stop, args.tokens) for x in ids]
    del hf
    variants = variants_in(onnx_dir)
    ours = {}
    for v in variants:  # one prompt at a time, as the clients run them (a padded batch can flip near-ties)
        runner = ONNXRunner(onnx_dir, variant=v)
        ours[v] = [until_stop(runner.generate(x, args.tokens), stop, args.tokens) for x in ids]
    rows: list[tuple[str, str, list[list[int]]]] = [("lorax runner", v, ours[v]) for v in variants]
    js_dtype = {"float32": "fp32", "float16": "fp16", "int8": "q8", "int4": "q4"}
    for v in variants:
        got = transformers_js(onnx_dir, js_dtype[v], prompts, args.tokens)
        if got is None:
            print("transformers.js: npm/node missing, skipped")
            break
        rows.append(("transformers.js", v, [until_stop(t, stop, args.tokens) for t in got]))
    primary = primary_variant(onnx_dir)
    rows.append(("onnxruntime-genai", primary, [until_stop(t, stop, args.tokens) for t in genai(onnx_dir, ids, args.tokens)]))
    for path in args.optimum_json:
        rec = json.loads(path.read_text())
        by_prompt = {p["prompt"]: p["optimum"] for p in rec["prompts"]}
        rows.append(("optimum", rec["variant"], [until_stop(by_prompt[p], stop, args.tokens) for p in prompts]))

    print(f"\n{len(prompts)} held-out prompts, greedy up to {args.tokens} tokens or the end of turn; "
          f"reference: transformers on {args.dist / 'merged'}")
    print("| client | graph | = reference (trained model) | = lorax's runner, same graph |")
    print("|---|---|---|---|")
    record = []
    for client, v, toks in rows:
        ref_same = sum(a == b for a, b in zip(toks, ref, strict=True))
        own_same = sum(a == b for a, b in zip(toks, ours[v], strict=True))
        print(f"| {client} | {v} | {ref_same}/{len(prompts)} | {own_same}/{len(prompts)} |")
        record.append({"client": client, "graph": v, "reference": ref_same, "runner": own_same, "n": len(prompts)})
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
