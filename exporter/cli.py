"""The `lorax` command line.

    lorax --help
    lorax --version
    lorax import-gguf model.gguf --out base/
    lorax train --config train.yaml
    lorax merge adapter/ --out merged/

Each subcommand lives in its own module and is imported only when it runs (a table below maps
names to modules), so `lorax --help` starts without importing torch. Commands parse flags, call one
function, and map `LoraxError` to a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import importlib
import sys

import click

from exporter.errors import LoraxError
from formats.errors import FormatError
from train.errors import TrainError

# Each package raises its own user-facing error type (dependencies point one way, so they cannot
# share one); all of them become `error: <one line>` and exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (FormatError, TrainError)

# name -> ("module:attribute", one-line help shown by `lorax --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "import-gguf": ("formats.gguf.import_cmd:command", "Turn a GGUF causal LM into a Hugging Face model directory."),
    "train": ("train.command:command", "QLoRA-train a LoRA adapter on a 4-bit base (writes adapter/ + lorax.json)."),
    "merge": ("exporter.merge_cmd:command", "Fold an adapter into full weights, exactly as the base was quantized in training."),
    "export": ("exporter.export_cmd:command", "Merge, write GGUF / ONNX, and run the parity gate on every artifact."),
    "check": ("exporter.check_cmd:command", "Parity gate: compare artifacts with the model as trained (exit 1 on drift)."),
    "baseline": ("exporter.baseline_cmd:command", "Save golden outputs of an artifact / compare a new build against them."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target, _ = COMMANDS[cmd_name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table: listing commands must not import them.
        rows = [(name, help_) for name, (_, help_) in sorted(COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from exporter.versions import version_report

    click.echo(version_report())
    ctx.exit(0)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show versions of lorax and its numeric stack (for bug reports), then exit.")
def cli() -> None:
    """lorax: QLoRA fine-tune -> merged weights -> GGUF / ONNX, with parity checks against the trained model."""


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the group and turns LoraxError into `error: ...` + exit code."""
    try:
        cli.main(args=argv, prog_name="lorax", standalone_mode=False)
    except LoraxError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except USER_ERRORS as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
