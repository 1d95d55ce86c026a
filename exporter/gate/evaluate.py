"""The parity gate: run the reference and every target on the same token ids, apply the thresholds.

    lorax check adapter/ dist/model-f32.gguf dist/model-q4_k_m.gguf dist/onnx --report dist/

The reference is the model as trained (exporter.gate.reference: base quantized as in training + adapter).
Every target gets the reference tokenizer's ids; a target whose own tokenizer would produce other
ids fails on that alone, because in use it would see different tokens. Metrics: exporter.gate.metrics.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from exporter.gate import metrics
from exporter.gate.samples import Sample
from exporter.gate.targets import Target
from exporter.gate.thresholds import MIN_TAIL_POSITIONS, TAIL_METRICS, limits_for, violations
from lorax_common.log import progress

log = logging.getLogger(__name__)


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
    # how the generations were found when checked against candidates (verified_generations), else None
    generation: dict | None = None


@dataclass(frozen=True)
class Yardstick:
    """What every model is measured on: the held-out samples as the reference tokenizer encodes them, and
    the greedy window compared per prompt (the gate and `--quant auto` share it)."""

    samples: list[Sample]
    tokenizer: Any
    gen_tokens: int = 16

    def outputs(self, runner, desc: str, candidates: list[list[int]] | None = None) -> RefOutputs:
        return run_outputs(runner, self.samples, self.tokenizer, self.gen_tokens, desc, candidates)

    def accuracy(self, gens: list[list[int]]) -> float | None:
        return task_accuracy(gens, self.samples, self.tokenizer)

    def longest(self) -> int:
        """The longest sequence a runner sees on these samples: a whole sample (teacher-forced) or a prompt
        and its greedy budget."""
        return max((max(len(s.ids), len(s.prompt_ids) + gen_budget(s, self.tokenizer, self.gen_tokens))
                    for s in self.samples), default=1)


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


def run_outputs(runner, samples: list[Sample], tokenizer, gen_tokens: int, desc: str,
                candidates: list[list[int]] | None = None) -> RefOutputs:
    """Teacher-forced logits and greedy generations of every sample, in batches the runner computes together
    (formats.runner.plan_batches: similar lengths grouped, padded logits within a share of free memory).
    `candidates` (another model's greedy tokens per sample) are checked instead of generated token by token:
    verified_generations."""
    budgets = [gen_budget(s, tokenizer, gen_tokens) for s in samples]
    vocab = max(len(tokenizer), 1)
    if samples and getattr(runner, "can_session", lambda: False)():
        from exporter.gate.session_outputs import session_outputs

        with progress(total=2 * len(samples), desc=desc, leave=False, unit="row") as bar:
            logits, gens, how = session_outputs(runner, samples, budgets, vocab, candidates, bar)
        return RefOutputs(logits, gens, generation=how)
    with progress(total=2 * len(samples), desc=desc, leave=False, unit="row") as bar:
        logits = batched_logits(runner, [s.ids for s in samples], vocab, bar)
        prompts = [s.prompt_ids for s in samples]
        if candidates is None:
            return RefOutputs(logits, batched_generations(runner, prompts, budgets, vocab, bar))
        gens, how = verified_generations(runner, prompts, budgets, candidates, vocab, bar)
    return RefOutputs(logits, gens, generation=how)


def batched_generations(runner, prompts: list[list[int]], budgets: list[int], vocab: int, bar=None) -> list:
    """Greedy `budgets[i]` tokens after each prompt, rows of similar length decoded together."""
    from formats.runner import batch_budget, plan_batches

    gens: list = [None] * len(prompts)
    width = max(budgets, default=0)
    for group in plan_batches([len(p) + width for p in prompts], vocab, batch_budget()):
        n = max(budgets[i] for i in group)
        for i, g in zip(group, runner.generate_batch([prompts[i] for i in group], n), strict=True):
            gens[i] = g[:budgets[i]]
        if bar is not None:
            bar.update(len(group))
    return gens


def verified_generations(runner, prompts: list[list[int]], budgets: list[int], candidates: list[list[int]],
                         vocab: int, bar=None) -> tuple[list[list[int]], dict]:
    """The runner's greedy tokens, found by checking `candidates` instead of decoding step by step.

    Greedy decoding picks argmax(logits) after each prefix, so one teacher-forced forward over prompt +
    candidate gives the runner's own choice at every position: where all agree (and the candidate ends where
    greedy would: a stop token or the budget), the candidate *is* the runner's greedy answer. At the first
    disagreement the runner's own token is taken and decoding continues from that prefix (batched), so the
    result never depends on where the candidates came from, only the time does. Returns the generations and
    {"rows", "verified", "continued"}."""
    stop = getattr(runner, "stop", set())
    cands = [list(c)[:b] for c, b in zip(candidates, budgets, strict=True)]
    logits = batched_logits(runner, [p + c for p, c in zip(prompts, cands, strict=True)], vocab)
    gens: list[list[int]] = []
    todo: list[int] = []
    for i, (p, c) in enumerate(zip(prompts, cands, strict=True)):
        gen, _ = accept(logits[i][len(p) - 1:].argmax(-1).tolist(), c, budgets[i], stop)
        gens.append(gen)
        if unfinished(gen, budgets[i], stop):
            todo.append(i)
    if bar is not None:
        bar.update(len(prompts) - len(todo))
    if todo:
        rest = batched_generations(runner, [prompts[i] + gens[i] for i in todo],
                                   [budgets[i] - len(gens[i]) for i in todo], vocab, bar)
        for i, r in zip(todo, rest, strict=True):
            gens[i] = gens[i] + r
    return gens, {"rows": len(prompts), "verified": len(prompts) - len(todo), "continued": len(todo)}


def accept(choice: list[int], cand: list[int], budget: int, stop: set[int]) -> tuple[list[int], int]:
    """(the runner's greedy tokens as far as `cand` shows them, how many of cand's tokens held). `choice`:
    the runner's argmax after the prompt and after each prefix of cand (len(cand) + 1 entries). Pure."""
    j = next((k for k, (a, b) in enumerate(zip(choice, cand, strict=False)) if a != b), len(cand))
    gen = cand[:j]
    if j < len(cand) or (len(cand) < budget and (not cand or cand[-1] not in stop)):
        gen = gen + [choice[j]]  # the first token the candidate got wrong (or left out)
    return gen, j


def unfinished(gen: list[int], budget: int, stop: set[int]) -> bool:
    """Greedy decoding would go on after `gen`: under budget and not stopped."""
    return bool(gen) and len(gen) < budget and gen[-1] not in stop


def run_reference(ref, yard: Yardstick, candidates: list[list[int]] | None = None) -> RefOutputs:
    return yard.outputs(ref, f"reference {ref.name}", candidates)


def proxy_target(targets: list[Target]) -> Target | None:
    """The target whose greedy tokens the reference checks instead of decoding its own (run first, its outputs
    kept for its own row): a lossless HF file where there is one (it agrees everywhere), else the first."""
    return next((t for t in targets if t.format == "hf"), targets[0] if targets else None)


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
    from lorax_common.memory import release

    runner = target.open(yard.longest())
    try:
        mismatch = tokenizer_mismatch(runner, yard.samples)
        out = yard.outputs(runner, target.name)
        return mismatch, out.logits, out.generations
    finally:
        runner.close()
        release()  # the next model's peak should not stack on this one's leftovers


def _result(target: Target, metrics_: dict, limits: dict, failures: list[str], **kw) -> TargetResult:
    passed = not failures
    return TargetResult(target.name, target.format, target.dtype, str(target.path), metrics_, limits, failures,
                        passed, gated=target.gated, note=target.note, **kw)


def evaluate_target(target: Target, yard: Yardstick, ref: RefOutputs, ref_accuracy: float | None,
                    overrides: dict | None = None, floor=None, outputs=None) -> TargetResult:
    """One target's row. Anything that stops it from being measured (it does not load, it crashes in its
    runtime) is a failed row carrying the error, so the other targets are still measured and reported.
    `outputs`: run_target's result when the target already ran (the reference's proxy)."""
    try:
        row = _evaluate(target, yard, ref, ref_accuracy, overrides, floor, outputs)
    except Exception as e:  # noqa: BLE001 - an artifact that cannot run is a failed artifact, not a crash
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = _result(target, {}, limits_for(target.format, target.dtype, overrides),
                      [f"could not be measured: {type(e).__name__}: {msg}"])
    return row


def _evaluate(target: Target, yard: Yardstick, ref: RefOutputs, ref_accuracy: float | None,
              overrides: dict | None, floor, outputs=None) -> TargetResult:
    from exporter.gate.floor import applies, relax, shipped_control

    samples, gen_tokens = yard.samples, yard.gen_tokens
    mismatch, logits, gens = outputs or run_target(target, yard)
    failures: list[str] = [mismatch] if mismatch else []
    fixed = list(failures)  # no floor excuses these
    if logits[0].shape[-1] != ref.logits[0].shape[-1]:
        failures.append(f"vocab: target has {logits[0].shape[-1]} logits per position, reference "
                        f"{ref.logits[0].shape[-1]}")
        return _result(target, {}, limits_for(target.format, target.dtype, overrides), failures)
    parity, klds = metrics.compare_positions(ref.logits, logits, [s.ids for s in samples],
                                             [s.scored for s in samples])
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
    early: dict[str, tuple] = {}  # the proxy's outputs, run before the reference and kept for its row
    proxy = proxy_target(targets)
    if proxy is not None:
        with clock(proxy.name):
            try:
                early[proxy.name] = run_target(proxy, yard)
            except Exception:  # noqa: BLE001 - measured again in turn below, where its failure is reported
                log.info("proxy %s did not run; the reference decodes its own tokens", proxy.name)
    with clock("reference"):
        cands = early[proxy.name][2] if proxy is not None and proxy.name in early else None
        ref_out, path = reference_outputs(ref, yard, reuse, candidates=cands, proxy=proxy.name if cands else None)
    ref_acc = yard.accuracy(ref_out.generations)
    results = []
    for t in progress(targets, desc="gate", unit="target"):
        with clock(t.name):
            results.append(evaluate_target(t, yard, ref_out, ref_acc, overrides, floor, early.pop(t.name, None)))
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
