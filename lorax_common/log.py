"""How much lorax says: `lorax -q ...` (errors only), `lorax ...` (progress bars), `lorax -v ...` (debug log).

    with verbosity(QUIET):            # scoped to this context (a contextvar), restored on exit
        for job in progress(jobs, desc="merge", unit="tensor"):
            ...

Every long step draws its bar through `progress`, so one flag silences all of them; module loggers
(`logging.getLogger(__name__)`) carry everything else, and the CLI attaches one stderr handler to the
`lorax` loggers for the length of a command only (`log_to_stderr`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

QUIET, NORMAL, VERBOSE = 0, 1, 2
# the packages whose module loggers the CLI shows (third-party loggers keep their own settings)
PACKAGES = ("exporter", "formats", "train", "lorax_common")
LEVELS = {QUIET: logging.ERROR, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}

_level: contextvars.ContextVar[int] = contextvars.ContextVar("lorax_verbosity", default=NORMAL)


def current() -> int:
    return _level.get()


@contextlib.contextmanager
def verbosity(level: int) -> Iterator[None]:
    """Inside, progress bars and lorax's loggers follow `level`; the previous level comes back on exit."""
    token = _level.set(level)
    try:
        yield
    finally:
        _level.reset(token)


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kw: Any):
    """A tqdm bar (kw as tqdm's), silent under -q or when the caller turns it off."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled or current() == QUIET, **kw)


@contextlib.contextmanager
def log_to_stderr(level: int) -> Iterator[None]:
    """One stderr handler on lorax's package loggers at `level`'s threshold, removed (and levels restored) after."""
    handler = logging.StreamHandler(sys.stderr)
    # "warning: ..." as the CLI's other lines read; -v adds the module that said it
    fmt = "%(levelname)s %(name)s: %(message)s" if level == VERBOSE else "lorax: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    loggers = [logging.getLogger(p) for p in PACKAGES]
    before = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(LEVELS[level])
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with verbosity(level), (_quiet_libraries() if level == QUIET else contextlib.nullcontext()):
            yield
    finally:
        for lg, (lvl, prop) in zip(loggers, before, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
            lg.propagate = prop


# libraries that log or draw bars of their own while lorax works (weights loading, kernel fallbacks)
QUIET_LIBRARIES = ("transformers", "bitsandbytes", "peft", "torch", "huggingface_hub")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Under -q: the libraries' loggers at ERROR, their warnings and transformers' progress bars off, all
    restored on exit (transformers is only touched when the command imported it)."""
    import warnings

    from lorax_common.scoped import logger_level

    with contextlib.ExitStack() as stack:
        for name in QUIET_LIBRARIES:
            stack.enter_context(logger_level(name, logging.ERROR))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.callback(_restore_bars, _bars_off())
        yield


def _bars_off() -> bool | None:
    """Turn transformers' bars off (importing it only to do so); the previous state, None when unknown."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    before = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return before


def _restore_bars(before: bool | None) -> None:
    if before:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
