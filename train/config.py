"""Training config: one dataclass, filled from defaults, then a YAML file, then command-line flags.

    lorax train --config train.yaml --max-steps 50 --lr 1e-4
    lorax train --config train.yaml --print-config

Every field below is a YAML key and a flag (`max_steps` <-> `--max-steps`); the command builds its
options from this table, so a new key is one line here. A YAML key that is not a field is an error
naming the key (a typo must not silently train with the default). Relative paths in a YAML file are
resolved against the file's folder, so a config travels with its data.

No heavy imports here: `lorax train --help` and `--print-config` must stay instant.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax_common.files import read_utf8
from train.errors import TrainError


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, range: Range | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "range": range})


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key: lo <= v (lo < v when lo_open), v < hi when hi is set."""

    lo: float
    lo_open: bool = False
    hi: float | None = None

    def problem(self, v: float) -> str | None:
        if v < self.lo or (self.lo_open and v == self.lo) or (self.hi is not None and v >= self.hi):
            return self.text()
        return None

    def text(self) -> str:
        low = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        return low + ("" if self.hi is None else f" and < {self.hi:g}")


POSITIVE, AT_LEAST_1, AT_LEAST_0, FRACTION = Range(0, lo_open=True), Range(1), Range(0), Range(0, hi=1)


@dataclass
class TrainConfig:
    # what to train on, where to write
    base: str | None = _opt(None, "Base model: a local Hugging Face directory (or a hub id when online).")
    data: str | None = _opt(None, "Training data: JSONL (messages | prompt+completion | text) or a datasets dir saved with save_to_disk.")
    eval_data: str | None = _opt(None, "Held-out eval data in the same forms (default: split eval_fraction off the training data).")
    out: str | None = _opt(None, "Adapter output directory (written atomically when training ends).")
    checkpoint_dir: str | None = _opt(None, "Where checkpoints go (default: <out>.checkpoints beside the output).")
    eval_fraction: float = _opt(0.1, "Share of the training data held out for eval (0 = no eval) when no eval_data is given.",
                                range=FRACTION)
    max_seq_len: int = _opt(512, "Longer examples are truncated to this many tokens (and counted).", range=Range(2))
    # how the base is loaded
    quant: str = _opt("nf4", "4-bit quantization of the base (bitsandbytes) or none for plain LoRA.", ("nf4", "fp4", "none"))
    double_quant: bool = _opt(True, "Quantize the 4-bit scales too (bitsandbytes double quant).")
    compute_dtype: str = _opt("auto", "Matmul dtype; auto = float32 on CPU (bf16 there is ~15x slower), bf16 on CUDA where supported.",
                              ("auto", "float32", "bfloat16", "float16"))
    load_dtype: str = _opt("auto", "dtype the base is loaded (and 4-bit quantized) in; auto = the compute dtype "
                           "(a bf16 load adds bf16 rounding to every 4-bit matmul on CPU).",
                           ("auto", "float32", "bfloat16", "float16"))
    # the adapter
    rank: int = _opt(16, "LoRA rank r.", range=AT_LEAST_1)
    alpha: int = _opt(32, "LoRA alpha (scale = alpha/r, or alpha/sqrt(r) with rslora).", range=AT_LEAST_1)
    dropout: float = _opt(0.05, "LoRA dropout.", range=FRACTION)
    target_modules: list[str] | str = _opt("all-linear", "Modules to adapt: all-linear or names, e.g. q_proj,v_proj.")
    use_rslora: bool = _opt(False, "Rank-stabilized LoRA scaling alpha/sqrt(r).")
    modules_to_save: list[str] | None = _opt(None, "Modules trained in full and saved with the adapter, e.g. lm_head.")
    # the run
    seed: int = _opt(0, "Seed for LoRA init, data order and dropout: same seed, same adapter.", range=AT_LEAST_0)
    max_steps: int = _opt(-1, "Optimizer steps to run (-1 = use epochs).", range=Range(-1))
    epochs: float = _opt(1.0, "Passes over the training data when max_steps is -1.", range=POSITIVE)
    lr: float = _opt(2e-4, "Peak learning rate.", range=POSITIVE)
    lr_scheduler: str = _opt("linear", "Learning-rate schedule (a transformers SchedulerType name: linear, cosine, ...).")
    warmup_steps: int = _opt(0, "Linear warmup steps.", range=AT_LEAST_0)
    weight_decay: float = _opt(0.0, "AdamW weight decay.", range=AT_LEAST_0)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = no clipping).", range=AT_LEAST_0)
    optim: str = _opt("adamw_torch", "Optimizer (transformers name, e.g. adamw_torch, paged_adamw_8bit on CUDA).")
    batch_size: int = _opt(4, "Examples per device per micro-batch.", range=AT_LEAST_1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.", range=AT_LEAST_1)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward: less memory, ~30% slower.")
    logging_steps: int = _opt(10, "Log the training loss every N steps.", range=AT_LEAST_1)
    eval_steps: int = _opt(0, "Evaluate every N steps (0 = only before and after training).", range=AT_LEAST_0)
    save_steps: int = _opt(50, "Write a checkpoint every N steps (what --resume continues from).", range=AT_LEAST_1)
    save_total_limit: int = _opt(2, "Keep at most this many checkpoints.", range=AT_LEAST_1)
    keep_checkpoints: bool = _opt(False, "Keep the checkpoint dir after a successful run (default: remove it).")


# annotation (as written above) -> function that checks/converts a YAML or flag value
def _as_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("an integer")
    return v


def _as_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("a number")
    return float(v)


def _as_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _as_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _as_list(v: Any) -> list[str]:
    # flags give "a,b"; YAML gives [a, b] or "a,b"
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError("a list of names")
    return items


def _as_modules(v: Any) -> list[str] | str:
    return "all-linear" if v == "all-linear" else _as_list(v)


def _nullable(parse):
    return lambda v: None if v is None else parse(v)


PARSERS = {
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
    "str | None": _nullable(_as_str),
    "list[str] | None": _nullable(_as_list),
    "list[str] | str": _as_modules,
}

# keys holding file paths: relative values in a YAML file are taken from the file's folder
PATH_KEYS = ("base", "data", "eval_data", "out", "checkpoint_dir")

# keys that must be set before training starts (print-config works without them)
REQUIRED = ("base", "data", "out")

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_value(key: str, value: Any, source: str) -> Any:
    """Check one value against its field's type and choices; TrainError names the key and source."""
    f = FIELDS[key]
    try:
        value = PARSERS[f.type](value)
    except (ValueError, TypeError, AttributeError) as e:
        raise TrainError(f"{source}: '{key}' must be {e}, got {value!r}") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise TrainError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    rng = f.metadata["range"]
    if rng is not None and (problem := rng.problem(value)):
        raise TrainError(f"{source}: '{key}' must be {problem}, got {value!r}")
    return value


# field -> (transformers' names for it, where they come from); checked when training starts (needs transformers)
TRAINER_NAMES: dict[str, tuple[str, str]] = {
    "lr_scheduler": ("transformers.trainer_utils", "SchedulerType"),
    "optim": ("transformers.training_args", "OptimizerNames"),
}


def check_trainer_names(cfg: TrainConfig) -> None:
    """--lr-scheduler / --optim must be names transformers accepts (a typo would fail deep in the Trainer)."""
    import importlib

    for key, (module, enum) in TRAINER_NAMES.items():
        names = [str(m.value) for m in getattr(importlib.import_module(module), enum)]
        value = getattr(cfg, key)
        if value not in names:
            near = difflib.get_close_matches(str(value), names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise TrainError(f"--{key.replace('_', '-')} {value!r} is not a transformers {enum}{hint}; "
                             f"choose one of: {', '.join(names)}")


def check_keys(keys: list[str], source: str) -> None:
    for key in keys:
        if key not in FIELDS:
            near = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise TrainError(f"{source}: unknown config key '{key}'{hint}; see `lorax train --print-config` for the keys")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Validated values from a YAML file, with relative paths resolved against the file's folder."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(read_utf8(path))  # non-UTF-8 bytes: one line naming file and line
    except FileNotFoundError:
        raise TrainError(f"config file {path} not found; check the --config path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TrainError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the file") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise TrainError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    check_keys(list(raw), str(path))
    values = {k: parse_value(k, v, str(path)) for k, v in raw.items()}
    for k in PATH_KEYS:
        v = values.get(k)
        if isinstance(v, str) and not Path(v).is_absolute():
            local = path.parent / v
            # `base` may be a hub id ("org/name"): only rebase it when it names a local path
            if k != "base" or local.exists():
                values[k] = str(local)
    return values


def resolve(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < YAML file < overrides (flags). Overrides with value None mean "not given"."""
    values: dict[str, Any] = read_yaml(config_file) if config_file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_keys(list(given), "flags")
    values.update({k: parse_value(k, v, f"--{k.replace('_', '-')}") for k, v in given.items()})
    return TrainConfig(**values)


def require(cfg: TrainConfig) -> None:
    missing = [k for k in REQUIRED if getattr(cfg, k) is None]
    if missing:
        flags = ", ".join(f"--{k}" for k in missing)
        raise TrainError(f"missing {flags}: set them in the --config YAML or as flags")


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path(f"{cfg.out}.checkpoints")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
