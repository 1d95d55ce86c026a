"""Parity thresholds: one table keyed by (format, dtype), overridable by flags or a YAML file.

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

_F32 = {"kld_mean": 1e-4, "kld_p99": 2e-3, "top1": 0.99, "ppl_ratio": 1.01, "greedy_match": 0.75}
_F16 = {"kld_mean": 1e-3, "kld_p99": 1e-2, "top1": 0.97, "ppl_ratio": 1.02, "greedy_match": 0.5}
_BF16 = {"kld_mean": 5e-3, "kld_p99": 5e-2, "top1": 0.94, "ppl_ratio": 1.03}

# (format, dtype) -> limits. Quantized types are not held to greedy match: one flipped token early
# changes the continuation, so a 4-bit model legitimately diverges; KLD and top-1 carry the gate.
THRESHOLDS: dict[tuple[str, str], dict[str, float]] = {
    ("hf", "float32"): _F32,
    ("hf", "float16"): _F16,
    ("hf", "bfloat16"): _BF16,
    ("gguf", "f32"): _F32,
    ("gguf", "f16"): _F16,
    ("gguf", "bf16"): _BF16,
    ("gguf", "q8_0"): {"kld_mean": 1.5e-2, "kld_p99": 0.15, "top1": 0.92, "ppl_ratio": 1.05},
    ("gguf", "q6_k"): {"kld_mean": 3e-2, "kld_p99": 0.3, "top1": 0.90, "ppl_ratio": 1.08},
    ("gguf", "q5_k_m"): {"kld_mean": 6e-2, "kld_p99": 0.6, "top1": 0.87, "ppl_ratio": 1.12},
    ("gguf", "q4_k_m"): {"kld_mean": 0.15, "kld_p99": 1.5, "top1": 0.80, "ppl_ratio": 1.30},
    ("gguf", "q4_0"): {"kld_mean": 0.25, "kld_p99": 2.5, "top1": 0.75, "ppl_ratio": 1.45},
    ("onnx", "float32"): {**_F32, "max_abs_logit": 1e-3, "kld_mean": 1e-4},
    ("onnx", "float16"): _F16,
    ("onnx", "int8"): {"kld_mean": 0.1, "kld_p99": 1.0, "top1": 0.85, "ppl_ratio": 1.2},
    # int4 is one scale + zero point per 32 weights, no super-blocks, no mixed precision: q4_0/q4_1's class,
    # so it gets q4_0's row (measured on SmolLM2 with HQQ: KLD 0.061-0.075, top-1 0.78-0.81)
    ("onnx", "int4"): {"kld_mean": 0.25, "kld_p99": 2.5, "top1": 0.75, "ppl_ratio": 1.45},
}

# Drift of one artifact between two builds (lorax baseline compare): the same file type run again
# after a runtime upgrade should barely move; a retrained adapter moves far past these.
DRIFT_THRESHOLDS: dict[str, float] = {"kld_mean": 5e-3, "top1": 0.97, "greedy_match": 0.9}


def limits_for(fmt: str, dtype: str, overrides: dict[str, float | None] | None = None) -> dict[str, float]:
    key = (fmt, dtype.lower())
    if key not in THRESHOLDS:
        known = ", ".join(f"{f}/{d}" for f, d in THRESHOLDS)
        raise KeyError(f"no thresholds for {fmt}/{dtype}; known: {known}; pass --threshold METRIC=VALUE")
    out = dict(THRESHOLDS[key])
    for k, v in (overrides or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


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
