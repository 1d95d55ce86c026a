"""The parity gate: run the reference and every target on the same token ids, apply the thresholds.

    lorax check adapter/ dist/model-f32.gguf dist/model-q4_k_m.gguf dist/onnx --report dist/

The reference is the model as trained (exporter.reference: base quantized as in training + adapter).
Every target gets the reference tokenizer's ids; a target whose own tokenizer would produce other
ids fails on that alone, because in use it would see different tokens. Metrics: exporter.metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from exporter import metrics
from exporter.samples import Sample
from exporter.targets import Target
from exporter.thresholds import limits_for, violations


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
    # the same type made from the base as trained, against that base (exporter.floor); None = not measured
    floor: dict[str, float] | None = None

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

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "targets"}
        d["targets"] = [t.as_dict() for t in self.targets]
        return d


@dataclass
class RefOutputs:
    logits: list[np.ndarray]
    generations: list[list[int]]


def gen_budget(sample: Sample, tokenizer, gen_tokens: int) -> int:
    """Tokens to generate: enough for the greedy-match window and for the reference answer."""
    if sample.answer is None:
        return gen_tokens
    return max(gen_tokens, len(tokenizer(sample.answer, add_special_tokens=False)["input_ids"]) + 2)


def run_reference(ref, samples: list[Sample], tokenizer, gen_tokens: int) -> RefOutputs:
    logits, gens = [], []
    for s in tqdm(samples, desc=f"reference {ref.name}", leave=False):
        logits.append(ref.logits(s.ids))
        gens.append(ref.generate(s.prompt_ids, gen_budget(s, tokenizer, gen_tokens)))
    return RefOutputs(logits, gens)


def answer_correct(gen: list[int], answer: str, tokenizer) -> bool:
    return tokenizer.decode(gen, skip_special_tokens=True).strip() == answer.strip()


def task_accuracy(gens: list[list[int]], samples: list[Sample], tokenizer) -> float | None:
    scored = [answer_correct(g, s.answer, tokenizer) for g, s in zip(gens, samples, strict=True) if s.answer]
    return float(np.mean(scored)) if scored else None


def tokenizer_mismatch(target: Target, samples: list[Sample]) -> str | None:
    for i, s in enumerate(samples):
        ids = target.runner.tokenize(s.text, add_special_tokens=False)
        if ids != s.ids:
            j = next((k for k, (a, b) in enumerate(zip(ids, s.ids, strict=False)) if a != b), min(len(ids), len(s.ids)))
            return (f"tokenizer: sample {i} ids differ from the reference at position {j} "
                    f"(reference {s.ids[j:j + 5]}, target {ids[j:j + 5]})")
    return None


def evaluate_target(target: Target, samples: list[Sample], ref: RefOutputs, tokenizer, gen_tokens: int,
                    ref_accuracy: float | None, overrides: dict | None = None, floor=None) -> TargetResult:
    limits = limits_for(target.format, target.dtype, overrides)
    failures: list[str] = []
    if (msg := tokenizer_mismatch(target, samples)) is not None:
        failures.append(msg)
    fixed = list(failures)  # no floor excuses these
    logits, gens = [], []
    for s in tqdm(samples, desc=target.name, leave=False):
        logits.append(target.runner.logits(s.ids))
        gens.append(target.runner.generate(s.prompt_ids, gen_budget(s, tokenizer, gen_tokens)))
    if logits[0].shape[-1] != ref.logits[0].shape[-1]:
        failures.append(f"vocab: target has {logits[0].shape[-1]} logits per position, reference "
                        f"{ref.logits[0].shape[-1]}")
        return TargetResult(target.name, target.format, target.dtype, str(target.path), {}, limits,
                            failures, False)
    parity = metrics.compare(ref.logits, logits, [s.ids for s in samples])
    m = parity.as_dict()
    m["greedy_match"] = metrics.greedy_match([g[:gen_tokens] for g in ref.generations],
                                             [g[:gen_tokens] for g in gens])
    acc = task_accuracy(gens, samples, tokenizer)
    if acc is not None:
        m["task_accuracy"] = acc
        m["task_accuracy_drop"] = (ref_accuracy or 0.0) - acc
    failures += violations(m, limits)
    floor_metrics = None
    # only a metric failure can be rounding; a tokenizer mismatch fails regardless, so no floor is built for it
    if floor is not None and floor.wanted(target, failed=len(failures) > len(fixed)):
        from exporter.floor import relax

        floor_metrics = floor.measure(target)
        limits = relax(limits, floor_metrics, fixed=set(overrides or {}))
        failures = fixed + violations(m, limits)
    klds = np.concatenate([metrics.kld_per_position(r, t) for r, t in zip(ref.logits, logits, strict=True)])
    return TargetResult(target.name, target.format, target.dtype, str(target.path), m, limits, failures,
                        not failures, kld_positions=klds.tolist(), floor=floor_metrics)


def run_gate(ref, reference_name: str, targets: list[Target], samples: list[Sample], tokenizer,
             prompts_source: str, gen_tokens: int = 16, overrides: dict | None = None, floor=None) -> Report:
    from exporter.versions import package_versions

    ref_out = run_reference(ref, samples, tokenizer, gen_tokens)
    ref_acc = task_accuracy(ref_out.generations, samples, tokenizer)
    results = [evaluate_target(t, samples, ref_out, tokenizer, gen_tokens, ref_acc, overrides, floor)
               for t in tqdm(targets, desc="gate", unit="target")]
    return Report(
        passed=all(r.passed for r in results),
        reference=reference_name,
        prompts=prompts_source,
        samples=len(samples),
        tokens=sum(len(s.ids) for s in samples),
        gen_tokens=gen_tokens,
        targets=results,
        reference_task_accuracy=ref_acc,
        versions=package_versions(),
    )
