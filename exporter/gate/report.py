"""Write the gate's report: report.json (machine), report.md (a person, worst target first), kld.svg.

    lorax check ... --report dist/    ->  dist/report.json, dist/report.md, dist/kld.svg
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from exporter.gate.evaluate import Report, TargetResult

COLUMNS = [  # (metric, header, format)
    ("kld_mean", "mean KLD", "{:.2e}"),
    ("kld_p99", "p99 KLD", "{:.2e}"),
    ("top1", "top-1", "{:.1%}"),
    ("max_abs_logit", "max |Δlogit|", "{:.3g}"),
    ("ppl_ratio", "PPL ratio", "{:.4f}"),
    ("greedy_match", "greedy match", "{:.0%}"),
    ("task_accuracy", "task acc.", "{:.0%}"),
]
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def severity(t: TargetResult) -> tuple:
    return (t.passed, -t.metrics.get("kld_mean", math.inf))


def to_markdown(report: Report) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# lorax parity report: {verdict}",
        "",
        f"Reference: {report.reference}  ",
        f"Prompts: {report.prompts} ({report.samples} sequences, {report.tokens} tokens teacher-forced, "
        f"greedy match over {report.gen_tokens} tokens)",
    ]
    if report.reference_task_accuracy is not None:
        lines.append(f"Reference task accuracy: {report.reference_task_accuracy:.0%}")
    lines += ["", "| target | format | type | " + " | ".join(h for _, h, _ in COLUMNS) + " | verdict |",
              "|---" * (len(COLUMNS) + 4) + "|"]
    for t in sorted(report.targets, key=severity):
        cells = []
        for key, _, fmt in COLUMNS:
            v = t.metrics.get(key)
            cell = "–" if v is None else fmt.format(v)
            if key in t.thresholds:
                cell += f" ({'≥' if key in ('top1', 'greedy_match') else '≤'}{t.thresholds[key]:.3g})"
            cells.append(cell)
        verdict = "pass" if t.passed else "**FAIL**: " + "; ".join(t.failures)
        if not t.gated:
            verdict = f"ungated ({'within' if t.passed else 'outside'} the row's limits): {t.note}"
        lines.append(f"| {t.name} | {t.format} | {t.dtype} | " + " | ".join(cells) + f" | {verdict} |")
    floored = [t for t in report.targets if t.floor]
    if floored:
        lines += ["", "Quantization floor: the same type made from the base as trained, against that base, on the "
                  "same ids (limits above are the worse of the table's and this floor's with margin):", ""]
        lines += [f"- {t.name}: floor mean KLD {t.floor['kld_mean']:.3g}, p99 {t.floor['kld_p99']:.3g}, "
                  f"top-1 {t.floor['top1']:.1%}, PPL ratio {t.floor['ppl_ratio']:.4f}" for t in floored]
    controlled = [t for t in report.targets if t.control]
    if controlled:
        lines += ["", "Lossless controls: the same writer's exact file of the same merged weights, against the "
                  "reference, held to the lossless row; a floor may relax a lossy target's limits only when its "
                  "control passed:", ""]
        for t in controlled:
            c = t.control
            state = "pass" if c["passed"] else "**FAIL**: " + "; ".join(c["failures"])
            lines.append(f"- {t.name}: control {t.format}/{c['type']} mean KLD {c['metrics']['kld_mean']:.3g}, "
                         f"top-1 {c['metrics']['top1']:.1%}: {state}")
    untested = [(t.name, u) for t in report.targets for u in t.untested]
    if untested:
        lines += ["", "Limits not applied (too few positions for a tail statistic):", ""]
        lines += [f"- {name}: {u}" for name, u in untested]
    path = report.reference_path
    if path.get("dequantized_once"):
        lines += ["", f"Reference path: the 4-bit base's {path['dequantized_once']} layers dequantized once "
                  f"({path['memory_mib']} MiB); on the first {path['verified_tokens']} tokens of a sample its logits equal "
                  f"bitsandbytes' own path bit for bit (max |Δlogit| {path['max_abs_logit_delta']:g})."]
    elif path.get("reason"):
        lines += ["", f"Reference path: bitsandbytes' 4-bit layers ({path['reason']})."]
    if path.get("bf16_products"):
        lines += ["", f"Reference arithmetic: bf16 linear products {path['bf16_products']}, as a GPU's bf16 GEMM "
                  "accumulates (hf targets computing in bf16 do the same); on the probe sample max |Δlogit| "
                  f"{path['bf16_max_abs_logit_vs_torch_kernel']:g} against torch's CPU bf16 kernel."]
    gen = path.get("generation")
    if gen:
        lines += ["", f"Reference greedy tokens: {gen['checked']}'s checked in one teacher-forced forward of the "
                  f"reference (its own argmax at every position): {gen['verified']}/{gen['rows']} rows equal; "
                  f"{gen['continued']} decoded on by the reference from the first token that differed."]
    outputs = path.get("outputs") or {}
    if outputs.get("reused"):
        lines += ["", f"Reference outputs: reused, stored {outputs['created']} ({outputs['stored']}); "
                  f"{outputs['seconds_skipped']:.0f} s of reference computation skipped."]
    elif outputs.get("stored"):
        lines += ["", f"Reference outputs: computed and stored for reuse ({outputs['stored']})."]
    if report.timing.get("stages"):
        from lorax_common.timing import summary_line

        lines += ["", f"Time: {summary_line(report.timing)}"]
    lines += ["", "Thresholds in parentheses; KLD = Σ p_ref·(log p_ref − log p_target) per position. "
              + ppl_scope(report), "![per-position KLD](kld.svg)", ""]
    return "\n".join(lines)


def ppl_scope(report: Report) -> str:
    """What the PPL ratio was taken over (samples.Sample.scored)."""
    m = next((t.metrics for t in report.targets if "ppl_positions" in t.metrics), None)
    if m is None or m["ppl_positions"] == m["positions"] - report.samples:
        return "PPL over every predicted token."
    return (f"PPL over the {m['ppl_positions']} predicted tokens training's loss scores (assistant turns, "
            "completions), not the prompts the model reads.")


def kld_svg(report: Report, width: int = 900, height: int = 320) -> str:
    """Per-position KLD of each target on a log scale, as a dependency-free SVG."""
    series = [(t.name, t.kld_positions) for t in report.targets if t.kld_positions]
    pad_l, pad_b, pad_t = 60, 30, 20
    plot_w, plot_h = width - pad_l - 180, height - pad_b - pad_t
    lo, hi = -8.0, 1.0  # log10 range shown: 1e-8 .. 10
    n = max((len(s) for _, s in series), default=1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for e in range(int(lo), int(hi) + 1):
        y = pad_t + plot_h * (hi - e) / (hi - lo)
        out.append(f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{pad_l - 6}" y="{y + 4:.1f}" text-anchor="end">1e{e}</text>')
    for i, (name, ks) in enumerate(series):
        pts = []
        for j, k in enumerate(ks):
            v = min(max(math.log10(max(k, 1e-12)), lo), hi)
            pts.append(f"{pad_l + plot_w * j / max(n - 1, 1):.1f},{pad_t + plot_h * (hi - v) / (hi - lo):.1f}")
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1" points="{" ".join(pts)}"/>')
        out.append(f'<text x="{pad_l + plot_w + 10}" y="{pad_t + 14 * (i + 1)}" fill="{color}">{name}</text>')
    out.append(f'<text x="{pad_l + plot_w / 2}" y="{height - 6}" text-anchor="middle">token position '
               '(all sequences, concatenated)</text>')
    out.append("</svg>")
    return "\n".join(out)


def portable(data: dict, out_dir: Path) -> dict:
    """Target paths inside `out_dir` written relative to it, so a copied or moved dist/ still names its files
    (readers join them to the report's folder: `dist / t["path"]`)."""
    root = out_dir.resolve()
    for t in data["targets"]:
        p = Path(t["path"]).resolve()
        if p.is_relative_to(root):
            t["path"] = str(p.relative_to(root))
    return data


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "svg": out_dir / "kld.svg"}
    texts = {"json": json.dumps(portable(report.as_dict(), out_dir), indent=2) + "\n", "md": to_markdown(report),
             "svg": kld_svg(report)}
    for key, path in paths.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(texts[key])
        tmp.replace(path)  # a reader never sees half a report
    return paths
