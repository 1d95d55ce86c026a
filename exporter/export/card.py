"""dist/README.md: a Hugging Face model card generated from the gate's report, never written by hand.

    lorax export adapter/ --out dist/ --gguf --onnx       # writes dist/README.md after the gate
    lorax card dist/                                      # (re)writes it from dist/report.json

The YAML front matter carries base_model, library_name, license (from the base, where it says one) and tags;
the body has the gate's table for every shipped file (type, size, mean KLD, top-1, task accuracy, verdict,
all taken from report.json), the training settings from the adapter's lorax.json, and how to run each file
in llama.cpp, llama-cpp-python, transformers.js and onnxruntime-genai. tests/test_card.py checks that the
table's numbers are report.json's and that the Python run instructions work as printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD = "README.md"
COLUMNS = ("file", "format", "type", "size (MB)", "mean KLD", "top-1", "task accuracy", "gate")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def base_facts(base_dir: Path | None) -> dict[str, str]:
    """License, name and hub id of the base as far as its own files say (README front matter, the GGUF an
    imported base came from); nothing is guessed."""
    facts: dict[str, str] = {}
    if base_dir is None or not base_dir.is_dir():
        return facts
    readme = base_dir / "README.md"
    if readme.is_file() and readme.read_text().startswith("---"):
        import yaml

        front = yaml.safe_load(readme.read_text().split("---", 2)[1]) or {}
        facts.update({k: str(front[k]) for k in ("license", "base_model") if front.get(k)})
    record = _read(base_dir / "lorax.json")
    src = Path(record.get("source", ""))
    if record.get("kind") == "import-gguf" and src.is_file():
        from formats.gguf.header import read_values

        keys = {"general.license": "license", "general.name": "name", "general.base_model.0.repo_url": "base_model_url"}
        values = read_values(src, set(keys))  # the header only: gguf-py's reader maps the whole file first
        for key, out in keys.items():
            if key in values and out not in facts:
                facts[out] = str(values[key])
    return facts


def rows(report: dict, out_dir: Path) -> list[dict[str, Any]]:
    """One row per gated file, numbers straight from report.json."""
    out = []
    for t in report.get("targets", []):
        path = out_dir / t["path"]  # relative to dist/ (exporter.gate.report.portable) or absolute
        rel = t["path"]
        m = t.get("metrics", {})
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else (
            path.stat().st_size if path.is_file() else 0)
        paired = not t.get("gated", True) or " + " in t["name"]  # a LoRA pair is named by both of its files
        out.append({"file": t["name"] if paired else str(rel), "format": t["format"],
                    "type": t["dtype"], "size_mb": size / 1e6, "kld_mean": m.get("kld_mean"), "top1": m.get("top1"),
                    "task_accuracy": m.get("task_accuracy"),
                    "gate": ("pass" if t["passed"] else "FAIL") if t.get("gated", True) else "not gated"})
    return out


def _cell(v: Any, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def table(rs: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rs:
        lines.append(f"| {r['file']} | {r['format']} | {r['type']} | {r['size_mb']:.1f} | "
                     f"{_cell(r['kld_mean'], '{:.3e}')} | {_cell(r['top1'], '{:.4f}')} | "
                     f"{_cell(r['task_accuracy'], '{:.4f}')} | {r['gate']} |")
    return lines


def training_lines(adapter_meta: dict) -> list[str]:
    if not adapter_meta:
        return ["The source was a model directory, not a lorax adapter: no training settings recorded."]
    q, lora, data, tr = (adapter_meta.get(k) or {} for k in ("quantization", "lora", "data", "training"))
    quant = (f"{q.get('quant_type')}{' + double quant' if q.get('double_quant') else ''}, blocksize "
             f"{q.get('blocksize')}, compute {q.get('compute_dtype')}") if q.get("method") == "bnb-4bit" else "none"
    items = [("base quantization in training", quant),
             ("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                      f"rsLoRA={lora.get('use_rslora')}, targets={lora.get('target_modules')}"),
             ("data", f"{Path(str(data.get('path', ''))).name} ({data.get('format')}, sha256 "
                      f"{str(data.get('sha256', ''))[:12]}…, max_seq_len {data.get('max_seq_len')})"),
             ("training", ", ".join(f"{k}={v}" for k, v in tr.items() if not isinstance(v, dict | list))),
             ("seed", adapter_meta.get("seed")), ("lorax", adapter_meta.get("lorax_version"))]
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in items)]


def run_lines(out_dir: Path, files: list[str]) -> list[str]:
    """How to run each shipped file, as commands that work from inside this folder."""
    ggufs = [f for f in files if f.endswith(".gguf") and "-lora-" not in f and not f.startswith("base-as-trained")]
    lines: list[str] = []
    if ggufs:
        g = next((f for f in ggufs if "q4_k_m" in f), ggufs[0])
        lines += ["### llama.cpp", "", "```bash", f"llama-cli -m {g} -cnv", "```", "",
                  "### llama-cpp-python", "", "```python",
                  "from llama_cpp import Llama",
                  f"llm = Llama(model_path={g!r}, verbose=False)",
                  'out = llm.create_chat_completion([{"role": "user", "content": "Hello!"}], max_tokens=32)',
                  'print(out["choices"][0]["message"]["content"])', "```", ""]
    loras = [f for f in files if "-lora-" in f]
    bases = [f for f in files if f.startswith("base-as-trained")]
    if loras and bases:
        lines += ["### LoRA GGUF (apply it to the base it was trained on, never to the original base)", "",
                  "```bash", f"llama-cli -m {bases[0]} --lora {loras[0]} -cnv", "```", ""]
    if (out_dir / "onnx").is_dir():
        lines += ["### transformers.js", "", "```js",
                  'import { env, pipeline } from "@huggingface/transformers";',
                  'env.allowRemoteModels = false; env.localModelPath = "./";  // run from this folder',
                  'const generator = await pipeline("text-generation", "onnx");',
                  'const out = await generator([{ role: "user", content: "Hello!" }], { max_new_tokens: 32 });',
                  "console.log(out[0].generated_text.at(-1).content);", "```", "",
                  "### onnxruntime-genai", "", "```python",
                  "import onnxruntime_genai as og",
                  'model = og.Model("onnx")',
                  "tokenizer = og.Tokenizer(model)",
                  'params = og.GeneratorParams(model); params.set_search_options(max_length=64)',
                  "generator = og.Generator(model, params)",
                  'chat = tokenizer.apply_chat_template(\'[{"role": "user", "content": "Hello!"}]\', '
                  'add_generation_prompt=True)',
                  "generator.append_tokens(tokenizer.encode(chat))",
                  "while not generator.is_done():",
                  "    generator.generate_next_token()",
                  "print(tokenizer.decode(generator.get_sequence(0)))", "```", ""]
    return lines


def render(out_dir: Path, report: dict, export_meta: dict, adapter_meta: dict) -> str:
    import yaml

    from exporter.gate.reference import read_adapter

    base_dir = None
    source = Path(export_meta.get("source", ""))
    if (source / "adapter_config.json").is_file():
        try:
            base_dir = read_adapter(source, "none" if not adapter_meta else None).base_dir
        except Exception:  # noqa: BLE001 - the card states what it knows; an unreadable base only drops facts
            base_dir = None
    facts = base_facts(base_dir)
    files = sorted(a["path"] for a in export_meta.get("artifacts", []))
    formats = {t["format"] for t in report.get("targets", [])}
    tags = ["lorax", *(["lora", "qlora"] if adapter_meta else []), *sorted(formats & {"gguf", "onnx"})]
    front: dict[str, Any] = {"library_name": "gguf" if "gguf" in formats else "transformers", "tags": tags}
    for key in ("base_model", "license"):
        if key in facts:
            front[key] = facts[key]
    if "base_model" not in front and (adapter_meta.get("base") or {}).get("hub_id"):
        front["base_model"] = adapter_meta["base"]["hub_id"]
    name = facts.get("name") or source.name
    verdict = "passed" if report.get("passed") else "FAILED"
    body = [f"# {name} fine-tune, exported by lorax", "",
            f"Every file below was measured against the model as trained (the base quantized exactly as in "
            f"training, plus the adapter) on {report.get('samples')} held-out sequences "
            f"({report.get('tokens')} tokens). Gate: **{verdict}**.", "",
            *table(rows(report, out_dir)), "",
            "KLD: mean over positions of Σ p_trained·(log p_trained − log p_file); top-1: share of positions whose "
            "most likely next token agrees. Details: report.md.", "",
            "## Training", "", *training_lines(adapter_meta), "", "## How to run", "", *run_lines(out_dir, files)]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"


def write_card(out_dir: str | Path) -> Path:
    """Write out_dir/README.md from out_dir/report.json and lorax.json (atomically)."""
    import os

    out_dir = Path(out_dir)
    export_meta = _read(out_dir / "lorax.json")
    source = Path(export_meta.get("source", ""))
    adapter_meta = _read(source / "lorax.json") if source.is_dir() else {}
    adapter_meta = adapter_meta if adapter_meta.get("kind") == "adapter" else {}
    text = render(out_dir, _read(out_dir / "report.json"), export_meta, adapter_meta)
    tmp = out_dir / f".{CARD}.{os.getpid()}.part"
    tmp.write_text(text)
    os.replace(tmp, out_dir / CARD)
    return out_dir / CARD
