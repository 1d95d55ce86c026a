"""Parity thresholds: the registry's rows (exporter.gate.registry), overridable by flags or a YAML file.

    lorax check adapter/ dist/model-q4_k_m.gguf --threshold kld_mean=0.2 --thresholds my.yaml

Every limit is a hard gate: a target past any of them fails (exit 1), never a log warning.
Direction per metric is in `HIGHER_IS_BETTER`; `None` means "reported, not gated".

Where the numbers come from (../shared/DESIGN.md): llama.cpp's own converter + quantizer on
SmolLM2-135M (512 tokens) measured f32 1.4e-5, q8_0 6.8e-3, q4_k_m 0.099 mean KLD; published
Llama-3-8B anchors q6_K 0.0055, q5_K_M 0.011, q4_0 0.072 (a 135M model quantizes 3-5x worse).
f32/f16 limits sit above the reference's own noise floor (bnb CPU 4-bit matmul, KLD ~5.6e-5).
"""

from __future__ import annotations

from pathlib import Path

# metric -> True when larger values are better (limit is a minimum), False for a maximum
HIGHER_IS_BETTER: dict[str, bool] = {
    "kld_mean": False,
    "kld_p99": False,
    "top1": True,
    "max_abs_logit": False,
    "ppl_ratio": False,
    "greedy_match": True,
    "task_accuracy_drop": False,
}

# How far a quantization floor may relax a table limit, whatever it measured: relaxed limit <= table limit x
# factor (maxima) or >= table limit - amount (minima). Basis, the largest relaxations honest exports needed
# (SmolLM2 QLoRA demo, 16 held-out prompts, 1520 tokens): q4_k_m mean KLD limit 0.15 -> 0.238 (x1.59),
# p99 1.5 -> 4.89 (x3.26), q8_0 p99 0.15 -> 0.224 (x1.49); top-1 and PPL never needed relaxing there. The
# tiny random models of all four architectures need far less (their floors are < 1e-2). A floor past the cap
# means the type destroys this model: the target fails instead of being excused.
# --floor: relax a failed lossy type up to its floor (auto), always measure the floor, or never
FLOOR_MODES = ("auto", "always", "off")
FLOOR_CAP: dict[str, tuple[str, float]] = {
    "kld_mean": ("x", 2.0),
    "kld_p99": ("x", 4.0),
    "top1": ("-", 0.10),
    "ppl_ratio": ("x", 1.25),
}

# Tail metrics need enough positions to be tails: with n positions p99 is about the (n/100)-th worst one,
# and below ~400 it is the maximum (4 chat prompts with answers, ~100 tokens: p99 = max). Under this count
# kld_p99 is reported but not gated; mean KLD and top-1 still are.
MIN_TAIL_POSITIONS = 400
TAIL_METRICS = ("kld_p99",)


def limits_for(fmt: str, dtype: str, overrides: dict[str, float | None] | None = None,
               positions: int | None = None) -> dict[str, float]:
    """The registry row of (fmt, dtype) with the user's overrides; tail limits dropped on too few positions
    (unless the user set them)."""
    from exporter.gate.registry import lookup

    out = dict(lookup(fmt, dtype).limits)
    if positions is not None and positions < MIN_TAIL_POSITIONS:
        for name in TAIL_METRICS:
            out.pop(name, None)
    for k, v in (overrides or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


# Drift of one artifact between two builds (lorax baseline compare): the same file type run again
# after a runtime upgrade should barely move; a retrained adapter moves far past these.
DRIFT_THRESHOLDS: dict[str, float] = {"kld_mean": 5e-3, "top1": 0.97, "greedy_match": 0.9}


def violations(metrics: dict[str, float], limits: dict[str, float]) -> list[str]:
    """Each limit the metrics break, as 'metric value > limit' strings (empty list = pass)."""
    out = []
    for name, limit in limits.items():
        value = metrics.get(name)
        if value is None:
            continue
        if value != value:  # NaN never passes a gate
            out.append(f"{name} is NaN")
        elif HIGHER_IS_BETTER[name] and value < limit:
            out.append(f"{name} {value:.4g} < {limit:.4g}")
        elif not HIGHER_IS_BETTER[name] and value > limit:
            out.append(f"{name} {value:.4g} > {limit:.4g}")
    return out


def parse_overrides(pairs: tuple[str, ...], yaml_file: str | Path | None) -> dict[str, float | None]:
    """--threshold kld_mean=0.2 (or =none to ungate) and a YAML mapping of the same; flags win."""
    import yaml

    out: dict[str, float | None] = {}
    if yaml_file:
        data = yaml.safe_load(Path(yaml_file).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{yaml_file}: expected a mapping metric: value")
        for k, v in data.items():
            out[_metric(k, yaml_file)] = None if v is None else float(v)
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--threshold {pair!r}: expected METRIC=VALUE, e.g. kld_mean=0.2")
        k, v = pair.split("=", 1)
        out[_metric(k, "--threshold")] = None if v.lower() == "none" else float(v)
    return out


def _metric(name: str, where) -> str:
    if name not in HIGHER_IS_BETTER:
        raise ValueError(f"{where}: unknown metric {name!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    return name
