"""`--quant auto`: build candidate GGUFs, measure each on the held-out data, ship the smallest within budget.

    lorax export adapter/ --out dist --gguf --quant auto --max-kld 0.1          # smallest file with KLD <= 0.1
    lorax export adapter/ --out dist --gguf --quant auto --max-size 110MB        # lowest KLD within 110 MB

Every candidate is a registry type plus a recipe (importance matrix, per-tensor types), quantized by
libllama from the one exact intermediate, and measured against the merged model in torch (float32; the
gate's lossless control holds it to the trained model within 1e-4 mean KLD) on the gate's own held-out
samples: mean KLD, top-1 and task accuracy. The winner is then gated like any `--quant` file, its floor
built with the same recipe. report.md gets the table and quant.svg (size vs KLD) of every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import LoraxError
from exporter.gate.evaluate import RefOutputs, Yardstick
from formats.gguf.quantize import Recipe


@dataclass(frozen=True)
class Candidate:
    qtype: str  # the registry row it is gated by
    recipe: Recipe = field(default_factory=Recipe)
    label: str = ""  # what the recipe adds, for the table ("imatrix", "imatrix, ffn_down=q6_k", ...)

    @property
    def name(self) -> str:
        return f"{self.qtype}+{self.label}" if self.label else self.qtype


@dataclass
class Measured:
    candidate: Candidate
    bytes: int
    metrics: dict[str, float]
    path: Path | None = None

    def row(self) -> dict:
        return {"name": self.candidate.name, "type": self.candidate.qtype, "bytes": self.bytes, **self.metrics}


def measure(candidates: Sequence[Candidate], inter: Path, work: Path, yard: Yardstick, ref: RefOutputs,
            keep: bool = False, show_progress: bool = True) -> list[Measured]:
    """Quantize every candidate from `inter` and measure it on `yard` against the reference outputs `ref`
    (one file on disk at a time unless `keep`)."""
    from exporter.gate import metrics
    from exporter.gate.targets import gguf_context
    from formats.gguf.quantize import quantize_gguf
    from formats.gguf.runner import GGUFRunner
    from lorax_common.log import progress

    out = []
    gen_tokens = yard.gen_tokens
    longest = yard.longest()  # every candidate's context sized as the gate sizes its targets'
    for c in progress(candidates, desc="quant candidates", unit="file", enabled=show_progress):
        path = work / f"cand-{c.name.replace('+', '_').replace('=', '-').replace(',', '')}.gguf"
        quantize_gguf(inter, path, c.qtype, force=True, recipe=c.recipe)
        runner = GGUFRunner(path, name=c.name, **gguf_context(longest))
        try:
            got = yard.outputs(runner, c.name)  # batched, as the gate measures the file it ships
        finally:
            runner.close()
        m = metrics.compare(ref.logits, got.logits, [s.ids for s in yard.samples],
                            [s.scored for s in yard.samples]).as_dict()
        m["greedy_match"] = metrics.greedy_match([g[:gen_tokens] for g in ref.generations],
                                                 [g[:gen_tokens] for g in got.generations])
        acc = yard.accuracy(got.generations)
        if acc is not None:
            m["task_accuracy"] = acc
        out.append(Measured(c, path.stat().st_size, m, path if keep else None))
        if not keep:
            path.unlink()
    return out


def choose(measured: Sequence[Measured], max_kld: float | None = None, max_size: int | None = None) -> Measured:
    """The smallest file with mean KLD <= max_kld (and bytes <= max_size); with only max_size, the lowest KLD
    that fits. Ties go to the lower KLD. One line naming the best miss when nothing qualifies."""
    if max_kld is None and max_size is None:
        raise LoraxError("--quant auto needs a budget: --max-kld X and/or --max-size BYTES")
    fits = [m for m in measured if (max_kld is None or m.metrics["kld_mean"] <= max_kld)
            and (max_size is None or m.bytes <= max_size)]
    if not fits:
        best = min(measured, key=lambda m: m.metrics["kld_mean"])
        raise LoraxError(f"no candidate meets the budget (max KLD {max_kld}, max size {max_size}); the closest is "
                         f"{best.candidate.name}: {best.bytes:,} bytes, mean KLD {best.metrics['kld_mean']:.4f}")
    if max_kld is None:
        return min(fits, key=lambda m: (m.metrics["kld_mean"], m.bytes))
    return min(fits, key=lambda m: (m.bytes, m.metrics["kld_mean"]))


def to_markdown(measured: Sequence[Measured], chosen: Measured | None, budget: str) -> str:
    lines = ["## Quantization candidates (`--quant auto`)", "",
             f"Budget: {budget}. Measured against the merged model on the gate's samples; ✔ = shipped.", "",
             "| candidate | bytes | mean KLD | top-1 | greedy match | task acc. | |", "|---|---:|---:|---:|---:|---:|---|"]
    for m in sorted(measured, key=lambda m: m.bytes):
        acc = m.metrics.get("task_accuracy")
        lines.append(f"| {m.candidate.name} | {m.bytes:,} | {m.metrics['kld_mean']:.4f} | {m.metrics['top1']:.1%} | "
                     f"{m.metrics.get('greedy_match', math.nan):.0%} | {'–' if acc is None else f'{acc:.0%}'} | "
                     f"{'✔' if m is chosen else ''} |")
    lines += ["", "![size vs KLD](quant.svg)", ""]
    return "\n".join(lines)


def size_kld_svg(measured: Sequence[Measured], chosen: Measured | None, width: int = 720, height: int = 360) -> str:
    """Bytes (x) vs mean KLD (y, log scale) of every candidate, the shipped one ringed; no dependencies."""
    pad_l, pad_r, pad_t, pad_b = 70, 190, 20, 40
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    xs = [m.bytes / 1e6 for m in measured]
    ys = [math.log10(max(m.metrics["kld_mean"], 1e-6)) for m in measured]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys)) if max(ys) > math.floor(min(ys)) else math.floor(min(ys)) + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return pad_l + pw * (x - x0) / max(x1 - x0, 1e-9), pad_t + ph * (y1 - y) / max(y1 - y0, 1e-9)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for e in range(y0, y1 + 1):
        _, y = px(x0, e)
        out.append(f'<line x1="{pad_l}" x2="{pad_l + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{pad_l - 6}" y="{y + 4:.1f}" text-anchor="end">1e{e}</text>')
    for i, m in enumerate(measured):
        x, y = px(xs[i], ys[i])
        color = "#d62728" if m is chosen else ("#1f77b4" if m.candidate.recipe.imatrix is not None else "#7f7f7f")
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{6 if m is chosen else 4}" fill="{color}"/>')
        out.append(f'<text x="{x + 7:.1f}" y="{y + 4:.1f}" fill="{color}">{m.candidate.name}</text>')
    out.append(f'<text x="{pad_l + pw / 2}" y="{height - 8}" text-anchor="middle">file size (MB); red: shipped, '
               'blue: with importance matrix, grey: plain</text>')
    out.append(f'<text x="14" y="{pad_t + ph / 2}" transform="rotate(-90 14 {pad_t + ph / 2})" '
               'text-anchor="middle">mean KLD vs trained model</text>')
    out.append("</svg>")
    return "\n".join(out)
