"""The flags several commands share, defined once: `lorax merge|export|check ... --trained-on nf4 --floor auto`.

    @click.command("check")
    @adapter_options
    @gate_options
    def command(adapter, artifacts, **flags): ...

Each group is a list of click options applied by one decorator; the choice lists come from the record's
and the gate's own tables (lorax_common.record, exporter.gate.thresholds), so a new value appears in every
command at once. Commands hand `**flags` to `build(Options, flags)`, which fills a dataclass by field name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

from exporter.gate.thresholds import FLOOR_MODES
from lorax_common.record import FLOAT_DTYPES, MERGE_BASES, TRAINED_ON
from lorax_common.units import parse_size

T = TypeVar("T")


class Size(click.ParamType):
    """A byte count written as 110MB, 1.2GiB or 123456."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class CountOrAuto(click.ParamType):
    """A positive integer, or `auto` (None: the command picks it)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is neither a positive integer nor auto", param, ctx)


def _group(*opts: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for opt in reversed(opts):  # click applies bottom-up; keep the listed order in --help
            fn = opt(fn)
        return fn

    return apply


# how to read an adapter that has no lorax.json (lorax train always writes one)
adapter_options = _group(
    click.option("--base", type=click.Path(exists=True, file_okay=False),
                 help="Base model dir [default: the one recorded in the adapter's lorax.json]."),
    click.option("--trained-on", type=click.Choice(TRAINED_ON), default=None,
                 help="For adapters without lorax.json: how the base was quantized in training (required there)."),
    click.option("--double-quant", is_flag=True, help="With --trained-on nf4/fp4: training used double quantization."),
)

merge_options = _group(
    click.option("--merge-base", type=click.Choice(MERGE_BASES), default=None,
                 help="Fold into the base as quantized in training (default for QLoRA adapters), the original "
                      "weights, or auto: build both and keep the one closer to the trained model."),
    click.option("--dtype", type=click.Choice(FLOAT_DTYPES), default=None,
                 help="Merged weights dtype [default: the dtype training computed in, so the merge is exact]."),
)

gate_options = _group(
    click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
                 help="JSONL prompts (messages / prompt+completion / text). Default: the adapter's eval.jsonl."),
    click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most this many prompts."),
    click.option("--gen-tokens", type=click.IntRange(min=1), default=16, show_default=True,
                 help="Greedy tokens compared per prompt."),
    click.option("--threshold", "thresholds", multiple=True, metavar="METRIC=VALUE",
                 help="Override a limit for every target (e.g. kld_mean=0.2, or =none to ungate)."),
    click.option("--floor", type=click.Choice(FLOOR_MODES), default="auto", show_default=True,
                 help="Quantization floor for lossy GGUF/ONNX types: when a table limit fails, measure the same "
                      "type on the base as trained and allow up to that loss (auto); always measure; or never."),
    click.option("--fresh-reference", "reuse_reference", flag_value=False, default=True,
                 help="Recompute the reference outputs even when a run on the same adapter, base, samples and "
                      "versions stored them ($LORAX_CACHE/reference; LORAX_REFERENCE_CACHE=off never stores)."),
)


def build(cls: type[T], flags: dict[str, Any], **extra: Any) -> T:
    """cls(**the flags whose names are its fields, **extra); a flag no field takes is a wiring bug."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {**flags, **extra}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field for {', '.join(unknown)}")
    return cls(**values)
