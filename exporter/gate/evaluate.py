"""The parity gate: run the reference and every target on the same token ids, apply the thresholds.

    lorax check adapter/ dist/model-f32.gguf dist/model-q4_k_m.gguf dist/onnx --report dist/

The reference is the model as trained (exporter.gate.reference: base quantized as in training + adapter).
Every target gets the reference tokenizer's ids; a target whose own tokenizer would produce other
ids fails on that alone, because in use it would see different tokens. Metrics: exporter.gate.metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from exporter.gate import metrics
from exporter.gate.samples import Sample
from exporter.gate.targets import Target
from exporter.gate.thresholds import MIN_TAIL_POSITIONS, TAIL_METRICS, limits_for, violations
from lorax_common.log import progress


@dataclass
class TargetResult:
    name: str
    format: str
    dtype: str
    path: str
    metrics: dict[str, float]
    thresholds: dict[str, float]
    failures: list[str]
    passed: bool
    kld_positions: list[float] = field(default_factory=list, repr=False)
    # the same type made from the base as trained, against that base (exporter.gate.floor); None = not measured
    floor: dict[str, float] | None = None
    # the lossless file of the same writer from the same merged weights, against the reference (lossy types)
    control: dict | None = None
    gated: bool = True  # False: shown for information, never fails the gate
    note: str = ""
    untested: list[str] = field(default_factory=list)  # limits of the row not applied here, and why

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("kld_positions")
        return d


@dataclass
class Report:
    passed: bool
    reference: str
    prompts: str
    samples: int
    tokens: int
    gen_tokens: int
    targets: list[TargetResult]
    reference_task_accuracy: float | None = None
    versions: dict = field(default_factory=dict)
    reference_path: dict = field(default_factory=dict)  # how the reference computed (exporter.gate.fast_reference)
    timing: dict = field(default_factory=dict)  # lorax_common.timing.Stopwatch.as_dict(): stages, total, peak RSS

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "targets"}
        d["targets"] = [t.as_dict() for t in self.targets]
        return d


@dataclass
class RefOutputs:
    logits: list[np.ndarray]
    generations: list[list[int]]
    # the reference store's key of these outputs (exporter.gate.reference_store), None when not keyed: what
    # the gate measures from them alone (control, floor) is remembered under it
    key: str | None = None


@dataclass(frozen=True)
class Yardstick:
    """What every model is measured on: the held-out samples as the reference tokenizer encodes them, and
    the greedy window compared per prompt (the gate and `--quant auto` share it)."""

    samples: list[Sample]
    tokenizer: Any
    gen_tokens: int = 16

    def outputs(self, runner, desc: str) -> RefOutputs:
        return run_outputs(runner, self.samples, self.tokenizer, self.gen_tokens, desc)

    def accuracy(self, gens: list[list[int]]) -> float | None:
        return task_accuracy(gens, self.samples, self.tokenizer)


def gen_budget(sample: Sample, tokenizer, gen_tokens: int) -> int:
    """Tokens to generate: enough for the greedy-match window and for the reference answer."""
    if sample.answer is None:
        return gen_tokens
    return max(gen_tokens, len(tokenizer(sample.answer, add_special_tokens=False)["input_ids"]) + 2)


def batched_logits(runner, seqs: list[list[int]], vocab: int, bar=None) -> list:
    """Teacher-forced logits of every sequence, in the batches formats.runner.plan_batches groups them into."""
    from formats.runner import batch_budget, plan_batches

    logits: list = [None] * len(seqs)
    for group in plan_batches([len(s) for s in seqs], vocab, batch_budget()):
        for i, lg in zip(group, runner.logits_batch([seqs[i] for i in group]), strict=True):
            logits[i] = lg
        if bar is not None:
            bar.update(len(group))
    return logits


def run_outputs(runner, samples: list[Sample], tokenizer, gen_tokens: int, desc: str) -> RefOutputs:
    """Teacher-forced logits and greedy generations of every sample, in batches the runner computes together
    (formats.runner.plan_batches: similar lengths grouped, padded logits within a share of free memory)."""
    from formats.runner import batch_budget, plan_batches

    budgets = [gen_budget(s, tokenizer, gen_tokens) for s in samples]
    vocab = max(len(tokenizer), 1)
    gens: list = [None] * len(samples)
    with progress(total=2 * len(samples), desc=desc, leave=False, unit="row") as bar:
        logits = batched_logits(runner, [s.ids for s in samples], vocab, bar)
        width = max(budgets)
        for group in plan_batches([len(s.prompt_ids) + width for s in samples], vocab, batch_budget()):
            n = max(budgets[i] for i in group)
            for i, g in zip(group, runner.generate_batch([samples[i].prompt_ids for i in group], n), strict=True):
                gens[i] = g[:budgets[i]]
            bar.update(len(group))
    return RefOutputs(logits, gens)


def run_reference(ref, yard: Yardstick) -> RefOutputs:
    return yard.outputs(ref, f"reference {ref.name}")


def answer_correct(gen: list[int], answer: str, tokenizer) -> bool:
    return tokenizer.decode(gen, skip_special_tokens=True).strip() == answer.strip()


def task_accuracy(gens: list[list[int]], samples: list[Sample], tokenizer) -> float | None:
    scored = [answer_correct(g, s.answer, tokenizer) for g, s in zip(gens, samples, strict=True) if s.answer]
    return float(np.mean(scored)) if scored else None


def tokenizer_mismatch(runner, samples: list[Sample]) -> str | None:
    for i, s in enumerate(samples):
        ids = runner.tokenize(s.text, add_special_tokens=False)
        if ids != s.ids:
            j = next((k for k, (a, b) in enumerate(zip(ids, s.ids, strict=False)) if a != b), min(len(ids), len(s.ids)))
            return (f"tokenizer: sample {i} ids differ from the reference at position {j} "
                    f"(reference {s.ids[j:j + 5]}, target {ids[j:j + 5]})")
    return None


def run_target(target: Target, yard: Yardstick):
    """(tokenizer mismatch or None, logits, generations) of one target, loaded for this call only."""
    runner = target.open()
    try:
        mismatch = tokenizer_mismatch(runner, yard.samples)
        out = yard.outputs(runner, target.name)
        return mismatch, out.logits, out.generations
    finally:
        runner.close()


def _result(target: Target, metrics_: dict, limits: dict, failures: list[str], **kw) -> TargetResult:
    passed = not failures
    return TargetResult(target.name, target.format, target.dtype, str(target.path), metrics_, limits, failures,
                        passed, gated=target.gated, note=target.note, **kw)


def evaluate_target(target: Target, yard: Yardstick, ref: RefOutputs, ref_accuracy: float | None,
                    overrides: dict | None = None, floor=None) -> TargetResult:
    """One target's row. Anything that stops it from being measured (it does not load, it crashes in its
    runtime) is a failed row carrying the error, so the other targets are still measured and reported."""
    try:
        row = _evaluate(target, yard, ref, ref_accuracy, overrides, floor)
    except Exception as e:  # noqa: BLE001 - an artifact that cannot run is a failed artifact, not a crash
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = _result(target, {}, limits_for(target.format, target.dtype, overrides),
                      [f"could not be measured: {type(e).__name__}: {msg}"])
    return row


def _evaluate(target: Target, yard: Yardstick, ref: RefOutputs, ref_accuracy: float | None,
              overrides: dict | None, floor) -> TargetResult:
    from exporter.gate.floor import applies, relax, shipped_control

    samples, gen_tokens = yard.samples, yard.gen_tokens
    mismatch, logits, gens = run_target(target, yard)
    failures: list[str] = [mismatch] if mismatch else []
    fixed = list(failures)  # no floor excuses these
    if logits[0].shape[-1] != ref.logits[0].shape[-1]:
        failures.append(f"vocab: target has {logits[0].shape[-1]} logits per position, reference "
                        f"{ref.logits[0].shape[-1]}")
        return _result(target, {}, limits_for(target.format, target.dtype, overrides), failures)
    parity, klds = metrics.compare_positions(ref.logits, logits, [s.ids for s in samples])
    limits = limits_for(target.format, target.dtype, overrides, positions=parity.positions)
    untested = [f"{k}: {parity.positions} positions < {MIN_TAIL_POSITIONS}" for k in TAIL_METRICS
                if k in limits_for(target.format, target.dtype) and k not in limits]
    m = parity.as_dict()
    m["greedy_match"] = metrics.greedy_match([g[:gen_tokens] for g in ref.generations],
                                             [g[:gen_tokens] for g in gens])
    acc = yard.accuracy(gens)
    if acc is not None:
        m["task_accuracy"] = acc
        m["task_accuracy_drop"] = (ref_accuracy or 0.0) - acc
    failures += violations(m, limits)
    floor_metrics, control = None, None
    if floor is not None and applies(target.format, target.dtype):
        ctl = floor.control(target.format, ref, shipped_control(target.format, target.dtype, target.path))
        control = {"type": ctl.dtype, "metrics": ctl.metrics, "thresholds": ctl.limits, "failures": ctl.failures,
                   "passed": ctl.passed}
        if not ctl.passed:
            failures.append(ctl.describe())  # a writer bug: no floor may excuse anything it wrote
        # only a metric failure can be rounding; a tokenizer mismatch fails regardless, so no floor is built
        elif floor.wanted(target.format, target.dtype, failed=len(failures) > len(fixed)):
            floor_metrics = floor.measure(target.format, target.dtype, ref.key)
            limits = relax(limits, floor_metrics, fixed=set(overrides or {}))
            failures = fixed + violations(m, limits)
    return _result(target, m, limits, failures, kld_positions=klds.tolist(), floor=floor_metrics,
                   control=control, untested=untested)


def run_gate(ref, targets: list[Target], yard: Yardstick, prompts_source: str, overrides: dict | None = None,
             floor=None, reuse: bool = True) -> Report:
    """Reference outputs once (or reused from an earlier run, exporter.gate.reference_store: `ref` is a
    ReferenceSource), then each target loaded, measured and closed in turn."""
    from exporter.gate.reference_store import reference_outputs
    from lorax_common.timing import Stopwatch
    from lorax_common.versions import package_versions

    clock = Stopwatch()
    with clock("reference"):
        ref_out, path = reference_outputs(ref, yard, reuse)
    ref_acc = yard.accuracy(ref_out.generations)
    results = []
    for t in progress(targets, desc="gate", unit="target"):
        with clock(t.name):
            results.append(evaluate_target(t, yard, ref_out, ref_acc, overrides, floor))
    return Report(
        passed=all(r.passed for r in results if r.gated),
        reference=ref.name,
        prompts=prompts_source,
        samples=len(yard.samples),
        tokens=sum(len(s.ids) for s in yard.samples),
        gen_tokens=yard.gen_tokens,
        targets=results,
        reference_task_accuracy=ref_acc,
        versions=package_versions(),
        reference_path=path,
        timing=clock.as_dict(),
    )
