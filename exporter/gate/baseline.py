"""Golden outputs of one artifact, and the drift of a later build against them.

    lorax baseline save dist/model-q4_k_m.gguf --prompts eval.jsonl --tokenizer dist/merged --out golden.json
    lorax baseline compare dist/model-q4_k_m.gguf --baseline golden.json     # exit 1 past the drift limits

The baseline keeps, per sequence, the token ids, the top-k log-probabilities at every position and the
greedy continuation, plus the versions that produced them. Drift KLD is computed on the top-k support
with the remaining probability mass as one extra bucket: the KL divergence of that coarse-grained
distribution, a lower bound of the full KLD that needs no full-vocabulary logits on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.errors import LoraxError
from exporter.gate.metrics import greedy_match, log_softmax
from exporter.gate.samples import Sample, fingerprint
from lorax_common.files import read_json_object

FORMAT_VERSION = 1


def topk(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-logprobs, axis=-1)[:, :k]
    return idx, np.take_along_axis(logprobs, idx, axis=-1)


def coarse_kld(base_idx: np.ndarray, base_lp: np.ndarray, new_logprobs: np.ndarray) -> np.ndarray:
    """KL(baseline || new) per position over the baseline's top-k tokens plus one 'rest' bucket."""
    p = np.exp(base_lp)
    q = np.exp(np.take_along_axis(new_logprobs, base_idx, axis=-1))
    p_rest = np.clip(1.0 - p.sum(-1), 1e-12, 1.0)
    q_rest = np.clip(1.0 - q.sum(-1), 1e-12, 1.0)
    q = np.clip(q, 1e-30, 1.0)
    kld = (p * (base_lp - np.log(q))).sum(-1) + p_rest * (np.log(p_rest) - np.log(q_rest))
    return np.maximum(kld, 0.0)


def save(runner, samples: list[Sample], artifact: str, gen_tokens: int = 16, k: int = 32) -> dict:
    from lorax_common.versions import package_versions

    seqs = []
    for s in samples:
        lp = log_softmax(runner.logits(s.ids))
        idx, vals = topk(lp, k)
        seqs.append({
            "text": s.text, "ids": s.ids, "prompt_ids": s.prompt_ids,
            "topk_ids": idx.tolist(), "topk_logprobs": np.round(vals, 6).tolist(),
            "greedy": runner.generate(s.prompt_ids, gen_tokens),
        })
    return {"format_version": FORMAT_VERSION, "artifact": artifact, "fingerprint": fingerprint(samples),
            "gen_tokens": gen_tokens, "k": k, "versions": package_versions(), "sequences": seqs}


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LoraxError(f"{path}: no such baseline; make one with `lorax baseline save`")
    data = read_json_object(path, "a baseline from `lorax baseline save`")
    if data.get("format_version") != FORMAT_VERSION or "sequences" not in data:
        raise LoraxError(f"{path}: not a lorax baseline (format_version {data.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}); re-save it with `lorax baseline save`")
    return data


@dataclass
class Drift:
    metrics: dict[str, float]
    kld_positions: np.ndarray


def check_inputs(baseline: dict, runner, samples: list[Sample] | None) -> None:
    """Refuse comparisons that would give meaningless numbers: other prompts, other tokenizer."""
    if samples is not None and fingerprint(samples) != baseline["fingerprint"]:
        raise LoraxError("baseline was made with other prompts (token-id fingerprint differs); compare with "
                         "the --prompts it was saved with, or save a new baseline")
    for i, seq in enumerate(baseline["sequences"]):
        ids = runner.tokenize(seq["text"], add_special_tokens=False)
        if ids != seq["ids"]:
            raise LoraxError(f"baseline sequence {i} tokenizes differently with this artifact's tokenizer "
                             "(baseline made with another tokenizer); save a new baseline for it")


def compare(baseline: dict, runner) -> Drift:
    klds, agree, base_greedy, new_greedy = [], [], [], []
    for seq in baseline["sequences"]:
        lp = log_softmax(runner.logits(seq["ids"]))
        b_idx, b_lp = np.asarray(seq["topk_ids"]), np.asarray(seq["topk_logprobs"])
        if lp.shape[0] != b_idx.shape[0]:
            raise LoraxError("artifact returned a different number of positions than the baseline holds")
        klds.append(coarse_kld(b_idx, b_lp, lp))
        agree.append(lp.argmax(-1) == b_idx[:, 0])
        base_greedy.append(seq["greedy"])
        new_greedy.append(runner.generate(seq["prompt_ids"], baseline["gen_tokens"]))
    k = np.concatenate(klds)
    m = {
        "kld_mean": float(k.mean()),
        "kld_p99": float(np.percentile(k, 99)),
        "top1": float(np.concatenate(agree).mean()),
        "greedy_match": greedy_match(base_greedy, new_greedy),
    }
    return Drift(m, k)


def drift_of(baseline: dict, artifact: str | Path, samples: list[Sample] | None = None) -> Drift:
    """Load `artifact`, check it reads the baseline's ids, measure its drift, close it."""
    from exporter.gate.targets import open_target

    runner = open_target(artifact).open()
    try:
        check_inputs(baseline, runner, samples)
        return compare(baseline, runner)
    finally:
        runner.close()


def drift_limits(pairs: tuple[str, ...]) -> dict[str, float]:
    """`lorax baseline compare`'s limits with --threshold METRIC=VALUE overrides (=none ungates one)."""
    from exporter.gate.thresholds import DRIFT_THRESHOLDS, parse_overrides

    try:
        limits = {**DRIFT_THRESHOLDS, **parse_overrides(pairs, None)}
    except ValueError as e:
        raise LoraxError(str(e)) from None
    return {k: v for k, v in limits.items() if v is not None}
