"""`lorax train`: QLoRA-train a LoRA adapter; every config key is also a flag.

    lorax train --config train.yaml
    lorax train --base base/ --data train.jsonl --out adapter/ --max-steps 50 --lr 2e-4 --rank 16
    lorax train --config train.yaml --no-quant --print-config
    lorax train --config train.yaml --resume          # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m exporter.cli.main train --config train.yaml

The options are generated from `train.config.TrainConfig` (one table), so a flag cannot drift from
its YAML key. Torch is imported only when training starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from train.config import TrainConfig
from train.errors import TrainError

# annotation of a config field -> click parameter type (lists are comma-separated strings)
CLICK_TYPES: dict[str, Any] = {
    "int": click.INT,
    "float": click.FLOAT,
    "str": click.STRING,
    "str | None": click.STRING,
    "list[str] | None": click.STRING,
    "list[str] | str": click.STRING,
}


def _ranged(annotation: str, rng: Any) -> click.ParamType:
    """The click type of a field; numbers with a Range in the config table get click's range check."""
    if rng is None or annotation not in ("int", "float"):
        return CLICK_TYPES[annotation]
    cls = click.IntRange if annotation == "int" else click.FloatRange
    kw = {"min_open": True} if rng.lo_open else {}
    if rng.hi is not None:
        kw["max_open"] = True
    return cls(min=rng.lo, max=rng.hi, **kw)


def config_options(f: Callable) -> Callable:
    """One option per config field; default None means "not given", so YAML values survive."""
    for fld in reversed(dataclasses.fields(TrainConfig)):
        flag = fld.name.replace("_", "-")
        help_ = fld.metadata["help"] + ("" if fld.default is None else f" [default: {fld.default}]")
        if fld.type == "bool":
            option = click.option(f"--{flag}/--no-{flag}", fld.name, default=None, help=help_)
        else:
            choices = fld.metadata["choices"]
            kind = click.Choice(choices) if choices else _ranged(fld.type, fld.metadata["range"])
            option = click.option(f"--{flag}", fld.name, type=kind, default=None, help=help_)
        f = option(f)
    return f


@click.command(name="train", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of config keys (flags override it).")
@config_options
@click.option("--no-quant", is_flag=True, help="Plain LoRA on the unquantized base (same as --quant none).")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the checkpoint dir.")
@click.option("--force", is_flag=True, help="Replace an existing output dir / discard old checkpoints.")
def command(config_file: str | None, no_quant: bool, print_config: bool, resume: bool, force: bool,
            **overrides: Any) -> None:
    """QLoRA-train a LoRA adapter on a 4-bit base; writes the adapter dir with lorax.json."""
    from train.config import dump_yaml, require, resolve

    if no_quant:
        if overrides.get("quant") not in (None, "none"):
            raise TrainError(f"--no-quant contradicts --quant {overrides['quant']}; pass one of them")
        overrides["quant"] = "none"
    cfg = resolve(config_file, overrides)
    if print_config:
        click.echo(dump_yaml(cfg), nl=False)
        return
    require(cfg)  # before importing torch: a missing flag is reported instantly
    from train.run import train

    train(cfg, resume=resume, force=force)
