"""The one error root and the exit-code contract every `lorax` command keeps.

    lorax merge adapter/ --out merged/; echo $?    # 0 passed, 1 gate failed, 2 bad input, 3 internal error

`exporter.cli.main` maps exceptions to codes: `GateFailed` -> 1, `UserError` (and its package
subclasses `LoraxError`, `FormatError`, `TrainError`) -> 2, anything else -> 3 with the traceback in
a log file. A message is one line: what is wrong (naming the file, field or flag) and the fix.
"""

from __future__ import annotations

EXIT_PASSED = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3

# code -> meaning, as `lorax --help` and the README print it
EXIT_CODES: dict[int, str] = {
    EXIT_PASSED: "success (every gated artifact passed)",
    EXIT_GATE_FAILED: "the parity/drift gate failed: an artifact drifted past a threshold (and nothing else)",
    EXIT_BAD_INPUT: "bad input or environment (file, field, flag, disk full, permissions): one line names it and the fix",
    EXIT_INTERNAL: "internal error (a bug): one line plus the path of a log file holding the traceback",
}


class LoraxExit(Exception):
    """An expected way for a command to end, with its exit code."""

    exit_code = EXIT_INTERNAL


class UserError(LoraxExit):
    """Bad input or environment: the message names the file/field/flag and how to fix it."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(LoraxExit):
    """A parity or drift check failed; the report says which metric of which target."""

    exit_code = EXIT_GATE_FAILED
