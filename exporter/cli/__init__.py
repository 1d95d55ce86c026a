"""The `lorax` command line: the group (`main`) and one module per command (export, merge, check, baseline).

    lorax --help
"""


def run() -> None:
    """The console script's target (pyproject: `lorax = "exporter.cli:run"`), so the script never moves."""
    from exporter.cli.main import run as run_main

    run_main()
