"""The `lorax` command line.

    lorax --help
    lorax --version
    lorax import-gguf model.gguf --out base/
    lorax train --config train.yaml
    lorax merge adapter/ --out merged/
    lorax -q export adapter/ --out dist/ --gguf      # -q: results and errors only; -v: debug log too

Each subcommand lives in its own module and is imported only when it runs (a table below maps
names to modules), so `lorax --help` starts without importing torch. Commands parse flags and call one
function; `main` maps what ends them to the exit-code contract (lorax_common.errors): 0 passed,
1 gate failed, 2 bad input or environment (one line), 3 internal error (one line + a log file with the
traceback). No command prints a traceback to the terminal.
"""

from __future__ import annotations

import errno
import importlib
import sys
import traceback
from datetime import datetime
from pathlib import Path

import click

from lorax_common.errors import EXIT_BAD_INPUT, EXIT_CODES, EXIT_INTERNAL, LoraxExit

# OSErrors the user fixes (the file is theirs, the disk is theirs): exit 2 with the path, not a bug report
USER_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota exceeded)",
    errno.EACCES: "fix the permissions or choose another path", errno.EPERM: "fix the permissions or choose another path",
    errno.EROFS: "the filesystem is read-only; choose another path", errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path", errno.EISDIR: "pass a file, not a directory", errno.EFBIG: "the file is too large here",
}
EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items()) + (
    "\n  (usage errors from flag parsing also exit 2; Ctrl-C exits 130)"
    "\nTracebacks of internal errors go to $LORAX_CACHE/logs (default ~/.cache/lorax/logs, else $TMPDIR).")

# name -> ("module:attribute", one-line help shown by `lorax --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "import-gguf": ("formats.gguf.import_cmd:command", "Turn a GGUF causal LM into a Hugging Face model directory."),
    "train": ("train.command:command", "QLoRA-train a LoRA adapter on a 4-bit base (writes adapter/ + lorax.json)."),
    "merge": ("exporter.cli.merge:command", "Fold an adapter into full weights, exactly as the base was quantized in training."),
    "export": ("exporter.cli.export:command", "Merge, write GGUF / ONNX, and run the parity gate on every artifact."),
    "check": ("exporter.cli.check:command", "Parity gate: compare artifacts with the model as trained (exit 1 on drift)."),
    "baseline": ("exporter.cli.baseline:command", "Save golden outputs of an artifact / compare a new build against them."),
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
    from lorax_common.versions import version_report

    click.echo(version_report())
    ctx.exit(0)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show versions of lorax and its numeric stack (for bug reports), then exit.")
@click.option("-v", "--verbose", is_flag=True, help="Also show lorax's debug log (which module said what).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or warnings; errors and results only.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """lorax: QLoRA fine-tune -> merged weights -> GGUF / ONNX, with parity checks against the trained model."""
    from lorax_common import log

    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other; pass one")
    level = log.VERBOSE if verbose else log.QUIET if quiet else log.NORMAL
    ctx.with_resource(log.log_to_stderr(level))  # for this command only: undone when it returns


def crash_log(exc: BaseException, argv: list[str] | None) -> Path | None:
    """Write the traceback of an internal error to a log file; its path (None when nothing is writable)."""
    import os
    import tempfile

    from lorax_common.cache import cache_dir

    name = f"crash-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = (f"lorax {' '.join(sys.argv[:1] + list(argv if argv is not None else sys.argv[1:]))}\n"
            f"python {sys.version.split()[0]}\n\n" + "".join(traceback.format_exception(exc)))
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the group and maps how it ended to the exit-code contract."""
    try:
        cli.main(args=argv, prog_name="lorax", standalone_mode=False)
    except LoraxExit as e:  # GateFailed (1), UserError and its package subclasses (2)
        click.echo(f"error: {_one_line(e)}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            return _internal(e, argv)
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"error: {e.strerror or e}{where}; {USER_ERRNOS[e.errno]}", err=True)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - the contract: a bug is exit 3 and a log, never a traceback
        return _internal(e, argv)
    return 0


def _internal(e: BaseException, argv: list[str] | None) -> int:
    log = crash_log(e, argv)
    where = f"traceback in {log}" if log else "no log file could be written"
    click.echo(f"internal error: {e.__class__.__name__}: {_one_line(e)} ({where}; please report it)", err=True)
    return EXIT_INTERNAL


def run() -> None:
    """The `lorax` command: this process is lorax's own, so its allocator is set for big models first
    (lorax_common.memory.large_blocks_to_os); main() itself, called in-process, changes no process state."""
    from lorax_common.memory import large_blocks_to_os

    large_blocks_to_os()
    sys.exit(main())


if __name__ == "__main__":
    run()
