"""The quantization floor: what a lossy type costs on the base as trained, on the gate's own prompts.

    lorax check adapter/ dist/model-q4_k_m.gguf                # floor measured where a table limit fails
    lorax check adapter/ dist/model-q4_k_m.gguf --floor off    # the table alone
    lorax check adapter/ dist/model-q4_k_m.gguf --floor always # measured and reported for every lossy target

Lossy types: GGUF q8_0 ... q2_k, ONNX int8/int4 (BUILDERS below).

Why it exists: a QLoRA model computes with NF4 (or FP4) weights, and the faithful merge keeps them on that
grid plus a low-rank delta. q4_k's grid cannot represent an NF4 grid, so re-quantizing loses more than
quantizing the original weights does. Measured on SmolLM2-135M, q4_k_m, the same 50 held-out JSON-task
prompts: original base vs its q4_k_m 0.069 mean KLD; NF4 base as trained vs its q4_k_m 0.191; the merged
fine-tune vs its q4_k_m 0.191. The table's limits were set from quantizing original weights, so a
faithful export of a QLoRA model could fail them while adding nothing to what the type itself loses.

So, for a lossy target that fails a limit: write the base exactly as training computed with it (no
adapter), convert it to the same type with the same code, and measure it against itself on the same token
ids. That metric's limit becomes the worse of the table's and the floor's times `MARGIN`. A broken export
(adapter left out, q/k permutation undone, wrong rope theta) stays far outside both: those break the
model, not the rounding. Limits the user set with --threshold are never relaxed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from exporter import metrics
from exporter.samples import Sample
from exporter.targets import Target

# metric -> (kind, amount): "x" multiplies the floor's value (a maximum), "-" subtracts from it (a minimum).
MARGIN: dict[str, tuple[str, float]] = {
    "kld_mean": ("x", 1.25),
    "kld_p99": ("x", 1.5),
    "top1": ("-", 0.02),
    "ppl_ratio": ("x", 1.05),
}

FLOOR_MODES = ("auto", "always", "off")


def _gguf_artifact(base_dir: Path, dtype: str, work: Path) -> Target:
    from formats.gguf.export import export_gguf
    from formats.gguf.runner import GGUFRunner

    out = export_gguf(base_dir, work / "gguf", [dtype], stem="floor", force=True, check_tokenizer=False,
                      progress=False)
    path = out.files[0].path
    return Target(path.name, "gguf", dtype, path, GGUFRunner(path, name=f"floor:{path.name}"))


def _onnx_artifact(base_dir: Path, dtype: str, work: Path) -> Target:
    from formats.onnx.export import export_onnx
    from formats.onnx.runner import ONNXRunner

    out = export_onnx(base_dir, work / f"onnx-{dtype}", quant=dtype, force=True)
    return Target(f"floor:onnx-{dtype}", "onnx", dtype, out.dir, ONNXRunner(out.dir))


# format -> (lossy types the floor applies to, builder of the same type from an HF dir)
BUILDERS: dict[str, tuple[frozenset[str], Callable[[Path, str, Path], Target]]] = {
    "gguf": (frozenset({"q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
                        "q3_k_m", "q3_k_s", "q3_k_l", "q2_k"}), _gguf_artifact),
    "onnx": (frozenset({"int8", "int4"}), _onnx_artifact),
}


def applies(target: Target) -> bool:
    types, _ = BUILDERS.get(target.format, (frozenset(), None))
    return target.dtype.lower() in types


def relax(limits: dict[str, float], floor: dict[str, float], fixed: set[str]) -> dict[str, float]:
    """Limits where each MARGIN metric becomes the worse of the table's and the floor's (with margin);
    metrics in `fixed` (set by the user) keep their limit."""
    out = dict(limits)
    for name, (kind, amount) in MARGIN.items():
        if name not in limits or name in fixed or floor.get(name) is None:
            continue
        if kind == "x":
            out[name] = max(limits[name], floor[name] * amount)
        else:
            out[name] = min(limits[name], floor[name] - amount)
    return out


class Floor:
    """Builds the base as trained once (lazily), then one same-type artifact per lossy (format, dtype)."""

    def __init__(self, adapter_dir: Path, samples: list[Sample], base=None, trained_on=None,
                 mode: str = "auto") -> None:
        if mode not in FLOOR_MODES:
            raise ValueError(f"--floor {mode!r}: expected one of {', '.join(FLOOR_MODES)}")
        self.adapter_dir, self.samples, self.base, self.trained_on, self.mode = (
            Path(adapter_dir), samples, base, trained_on, mode)
        self._work: Path | None = None
        self._base_logits: list | None = None
        self._measured: dict[tuple[str, str], dict[str, float]] = {}

    def wanted(self, target: Target, failed: bool) -> bool:
        return applies(target) and (self.mode == "always" or (self.mode == "auto" and failed))

    def _base(self) -> Path:
        from exporter.merge import merge_adapter
        from formats.hf import HFRunner

        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="lorax-floor-"))
            merge_adapter(self.adapter_dir, self._work / "base", trained_on=self.trained_on, base_dir=self.base,
                          verify=False, progress=False, adapter_weights=False)
            runner = HFRunner(self._work / "base", name="floor:base-as-trained")
            self._base_logits = [runner.logits(s.ids) for s in self.samples]
        return self._work / "base"

    def measure(self, target: Target) -> dict[str, float]:
        """Parity of the same type, made from the base as trained, against that base (cached per type)."""
        key = (target.format, target.dtype.lower())
        if key not in self._measured:
            base = self._base()
            art = BUILDERS[target.format][1](base, key[1], self._work)
            parity = metrics.compare(self._base_logits, [art.runner.logits(s.ids) for s in self.samples],
                                     [s.ids for s in self.samples])
            self._measured[key] = parity.as_dict()
            del art
        return self._measured[key]

    def close(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
