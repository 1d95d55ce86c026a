"""The quantization floor, and the lossless control that must pass before a floor may excuse anything.

    lorax check adapter/ dist/model-q4_k_m.gguf                # control always; floor where a table limit fails
    lorax check adapter/ dist/model-q4_k_m.gguf --floor off    # control, then the table alone
    lorax check adapter/ dist/model-q4_k_m.gguf --floor always # floor measured and reported for every lossy target

Lossy types: the registry's `quantized` rows (GGUF q8_0 ... q4_0, ONNX int8/int4).

Why a floor: a QLoRA model computes with NF4 (or FP4) weights, and the faithful merge keeps them on that grid
plus a low-rank delta. q4_k's grid cannot represent an NF4 grid, so re-quantizing loses more than quantizing
the original weights does (SmolLM2-135M, q4_k_m, 50 held-out prompts: original base vs its q4_k_m 0.069 mean
KLD; NF4 base as trained vs its q4_k_m 0.191; merged fine-tune vs its q4_k_m 0.191). So for a lossy target
that fails a table limit, the base exactly as training computed with it (no adapter) is converted to the same
type by the same writer and measured against itself on the same ids; the limit becomes the worse of the
table's and the floor's (with `MARGIN`), never past `thresholds.FLOOR_CAP`, never for a user's --threshold.

Why a control: the floor's file comes from the same writer as the target, so a writer bug that hits every
file (q/k rows not permuted, a wrong rope theta or norm epsilon, a tensor in the wrong slot) inflates the
floor too and would excuse itself. The control is a lossless file (the merged weights' exact GGUF type, or
ONNX float32) made by the same writer from the same merged weights and measured against the *reference*
(the trained model, which shares no code with the writers), held to the lossless row. A lossy target whose
control fails, fails, with the control's failure named; only a passing control lets a floor relax a limit.

Both measurements are remembered beside stored reference outputs (reference_store.remember), named by what
they depend on beyond the entry's key (merge settings or the merged dir's identity, type, recipe). That key
covers lorax's own source, so changed writer code is re-measured. A second check of the same build
therefore measures only its targets.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exporter.gate import metrics
from exporter.gate.registry import lookup
from exporter.gate.samples import Sample
from exporter.gate.thresholds import FLOOR_CAP, FLOOR_MODES, limits_for, violations
from exporter.merge.api import MergeOptions

if TYPE_CHECKING:
    from exporter.gate.evaluate import RefOutputs

log = logging.getLogger(__name__)

# metric -> (kind, amount): "x" multiplies the floor's value (a maximum), "-" subtracts from it (a minimum).
MARGIN: dict[str, tuple[str, float]] = {
    "kld_mean": ("x", 1.25),
    "kld_p99": ("x", 1.5),
    "top1": ("-", 0.02),
    "ppl_ratio": ("x", 1.05),
}


def applies(fmt: str, dtype: str) -> bool:
    """A lossy (quantized) registry type: it gets a control, and may get a floor."""
    return lookup(fmt, dtype).quantized


def _apply(kind: str, amount: float, value: float) -> float:
    return value * amount if kind == "x" else value - amount


def relax(limits: dict[str, float], floor: dict[str, float], fixed: set[str]) -> dict[str, float]:
    """Limits where each MARGIN metric becomes the worse of the table's and the floor's (with margin), but
    never past FLOOR_CAP of the table's; metrics in `fixed` (set by the user) keep their limit."""
    out = dict(limits)
    for name, (kind, amount) in MARGIN.items():
        if name not in limits or name in fixed or floor.get(name) is None:
            continue
        cap = _apply(*FLOOR_CAP[name], limits[name])
        relaxed = _apply(kind, amount, floor[name])
        out[name] = min(max(limits[name], relaxed), cap) if kind == "x" else max(min(limits[name], relaxed), cap)
    return out


@dataclass
class Control:
    """A lossless file of the target's writer, made from the same merged weights, against the reference."""

    format: str
    dtype: str
    metrics: dict[str, float]
    limits: dict[str, float]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        return (f"control {self.format}/{self.dtype} (lossless, same writer, same merged weights) failed: "
                f"{'; '.join(self.failures)}")


class Floor:
    """Lazily builds, in one temp dir: the merged weights (when not given), the base as trained, and per
    (format, type) the control and floor files; every measurement is cached for the gate's run."""

    def __init__(self, samples: list[Sample], *, adapter_dir: Path | None = None, merged_dir: Path | None = None,
                 merge: MergeOptions | None = None, mode: str = "auto", recipes: dict | None = None,
                 vocab: int = 2**16, controls: dict | None = None) -> None:
        if mode not in FLOOR_MODES:
            raise ValueError(f"--floor {mode!r}: expected one of {', '.join(FLOOR_MODES)}")
        if adapter_dir is None and merged_dir is None:
            raise ValueError("Floor needs an adapter dir or the merged weights")
        self.samples, self.mode = samples, mode
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._merged = Path(merged_dir) if merged_dir else None
        self._given_merged = self._merged
        self.merge = merge or MergeOptions(verify=False, progress=False)
        self.vocab = vocab  # sizes the logits batches (formats.runner.plan_batches)
        self.recipes = recipes or {}  # GGUF type -> the target's Recipe: the floor file is quantized the same way
        self._work: Path | None = None
        self._base_logits: list[np.ndarray] | None = None
        self._floors: dict[tuple[str, str], dict[str, float]] = {}
        self._controls: dict[str, Control] = {}  # format -> its lossless control
        # format -> (path, type): lossless files of the merged weights the caller's writer already made
        self._given_controls: dict[str, tuple[Path, str]] = dict(controls or {})

    @property
    def work(self) -> Path:
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="lorax-floor-"))
        return self._work

    def wanted(self, fmt: str, dtype: str, failed: bool) -> bool:
        return (self.adapter_dir is not None and applies(fmt, dtype)
                and (self.mode == "always" or (self.mode == "auto" and failed)))

    def merged(self) -> Path:
        """The merged weights the target was made from (given by the pipeline, else merged here)."""
        if self._merged is None:
            from exporter.merge.api import merge_adapter

            self._merged = merge_adapter(self.adapter_dir, self.work / "merged", self.merge)
        return self._merged

    def base_as_trained(self) -> Path:
        """The base exactly as training computed with it, without the adapter."""
        out = self.work / "base-as-trained"
        if not out.exists():
            from dataclasses import replace

            from exporter.merge.api import merge_adapter

            merge_adapter(self.adapter_dir, out, replace(self.merge, adapter_weights=False))
        return out

    def _logits(self, fmt: str, path: Path) -> list[np.ndarray]:
        from exporter.gate.evaluate import batched_logits
        from exporter.gate.targets import open_runner
        from lorax_common.memory import release

        seqs = [s.ids for s in self.samples]
        runner = open_runner(fmt, path, name=f"probe:{path.name}", tokens=max(map(len, seqs), default=1))
        try:
            return batched_logits(runner, seqs, self.vocab)
        finally:
            runner.close()
            release()

    def _weights_identity(self) -> list:
        """What the merged weights (and the base as trained) depend on beyond the reference's own key: the
        merged dir the pipeline gave, or the merge settings this floor would merge with."""
        from exporter.gate.reference_store import dir_identity

        if self._given_merged is not None:
            return ["dir", dir_identity(self._given_merged)]
        m = self.merge
        return ["merge", m.merge_base, m.dtype, m.trained_on, m.double_quant, str(m.base_dir)]

    def control(self, fmt: str, ref: RefOutputs, shipped: Path | None = None) -> Control:
        """The lossless control of `fmt` against the reference outputs (cached per format, and remembered
        beside stored reference outputs: a second check of the same build skips the merge and the file).
        `shipped`: the export's own lossless file of the same weights (shipped_control), measured instead of
        building one."""
        from exporter.gate import reference_store as store
        from exporter.gate.registry import build

        if fmt in self._controls:
            return self._controls[fmt]
        name = store.measurement_name("control", fmt, self._weights_identity())
        if (hit := store.recall(ref.key, name)) is not None:
            log.info("control %s/%s: reused the measurement stored with the reference outputs", fmt, hit["dtype"])
            self._controls[fmt] = Control(fmt, hit["dtype"], hit["metrics"], hit["limits"], hit["failures"])
            return self._controls[fmt]
        made = (shipped, "float32") if shipped is not None else self._given_controls.get(fmt)
        if made is not None:
            path, dtype = made
            log.info("control %s: the export's own %s (same writer, same run, same weights)", fmt, path)
        else:
            merged = self.merged()
            dtype = control_type(fmt, merged)
            path = build(fmt, merged, dtype, self.work, "control")
        parity = metrics.compare(ref.logits, self._logits(fmt, path), [s.ids for s in self.samples],
                                 [s.scored for s in self.samples])
        m = parity.as_dict()
        limits = limits_for(fmt, dtype, positions=parity.positions)
        self._controls[fmt] = Control(fmt, dtype, m, limits, violations(m, limits))
        if made is None:
            _remove(path)
        store.remember(ref.key, name, asdict(self._controls[fmt]))
        return self._controls[fmt]

    def measure(self, fmt: str, dtype: str, ref_key: str | None = None) -> dict[str, float]:
        """Parity of the same type, made from the base as trained, against that base (cached per type, and
        remembered beside the reference outputs of `ref_key`: the base as trained is a function of them)."""
        from exporter.gate import reference_store as store
        from exporter.gate.registry import build, recipe_key

        key = (fmt, dtype.lower())
        if key in self._floors:
            return self._floors[key]
        recipe = self.recipes.get(recipe_key(fmt, key[1]))
        name = store.measurement_name("floor", fmt, key[1], self._weights_identity(),
                                      None if recipe is None else recipe.identity())
        if (hit := store.recall(ref_key, name)) is not None:
            log.info("floor %s/%s: reused the measurement stored with the reference outputs", *key)
            self._floors[key] = hit
            return hit
        base = self.base_as_trained()
        if self._base_logits is None:
            self._base_logits = self._logits("hf", base)
        path = build(fmt, base, key[1], self.work, "floor", recipe=recipe)
        self._floors[key] = metrics.compare(self._base_logits, self._logits(fmt, path),
                                            [s.ids for s in self.samples],
                                            [s.scored for s in self.samples]).as_dict()
        _remove(path)
        store.remember(ref_key, name, self._floors[key])
        return self._floors[key]

    def original_base_gguf(self) -> Path:
        """A GGUF of the original base weights (exact type), to show what a LoRA GGUF costs over it."""
        from exporter.gate.reference import read_adapter
        from exporter.gate.registry import build
        from formats.gguf.writer import source_type

        m = self.merge
        base = read_adapter(self.adapter_dir, m.trained_on, m.double_quant, m.base_dir).base_dir
        return build("gguf", base, source_type(base), self.work, "original-base")

    def close(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None


def shipped_control(fmt: str, dtype: str, path: Path) -> Path | None:
    """The lossless file an ONNX target's own export wrote beside it, or None.

    `lorax export --onnx --onnx-quant int4` writes onnx/model.onnx (float32) and quantizes it into
    onnx/model_q4.onnx in one run, and lorax.json lists both variants: that float32 graph is exactly the
    control's file (the same writer's exact file of the same merged weights). Measuring it saves building
    the graph again (the whole ONNX export: minutes at 1B+). GGUF dirs ship no merged f32 file; `lorax
    export` keeps the one libllama quantized from for the gate instead (GateOptions.controls)."""
    if fmt != "onnx" or dtype == "float32":
        return None
    from formats.onnx import bundle

    root = bundle.export_root(path)
    if root is None:
        return None
    variants = bundle.read_meta(root).get("variants") or {}
    graph = bundle.graph_path(root, "float32")
    return graph if {"float32", dtype} <= set(variants) and graph.is_file() else None


def control_type(fmt: str, merged: Path) -> str:
    """The lossless type of `fmt` that holds the merged weights exactly."""
    if fmt == "gguf":
        from formats.gguf.writer import source_type

        return source_type(merged)
    return "float32"


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
