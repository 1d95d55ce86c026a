"""`lorax check ADAPTER ARTIFACT...`: exit 1 when any artifact drifts past its threshold."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from exporter.cli.options import adapter_options, gate_options


@click.command("check")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@adapter_options
@click.option("--lora", type=click.Path(exists=True, dir_okay=False),
              help="A llama.cpp LoRA GGUF to apply to every GGUF artifact (e.g. dist/model-lora-f32.gguf over "
                   "dist/base-as-trained-f32.gguf); the report also shows it over the original base, ungated.")
@gate_options
@click.option("--thresholds", "thresholds_yaml", type=click.Path(exists=True, dir_okay=False),
              help="YAML mapping metric: limit, applied to every target (flags win).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json, report.md and kld.svg here.")
def command(adapter: str, artifacts: tuple[str, ...], thresholds: tuple[str, ...], thresholds_yaml: str | None,
            **flags) -> None:
    """Compare each ARTIFACT (GGUF file, ONNX dir, merged HF dir) with the model as trained.

    Lossy types (GGUF q8_0..q4_0, ONNX int8/int4) also get a lossless control: the same writer's exact file
    of the same merged weights, held to the lossless limits; a quantization floor can only relax a limit
    when that control passed, and never past the cap in exporter/gate/thresholds.py."""
    from exporter.cli.options import build
    from exporter.errors import LoraxError
    from exporter.gate.check import GateOptions, check
    from exporter.gate.preflight import check_artifacts, check_thresholds_yaml
    from exporter.gate.report import to_markdown
    from exporter.gate.thresholds import parse_overrides
    from lorax_common.outputs import check_writable_dir

    # bad inputs and an unwritable --report fail now, not after the whole gate ran
    if flags["report_dir"]:
        check_writable_dir(flags["report_dir"], "--report")
    check_thresholds_yaml(thresholds_yaml)
    check_artifacts(list(artifacts))
    try:
        overrides = parse_overrides(thresholds, thresholds_yaml)
    except ValueError as e:
        raise LoraxError(str(e)) from None
    opts = build(GateOptions, flags, overrides=overrides)
    # the floor builds each lossy type as its export did (importance matrix, tensor types): lorax.json beside it
    from exporter.export.gguf_build import merged_of_artifacts, recipes_of_artifacts

    paths = [Path(a) for a in artifacts]
    opts = replace(opts, recipes=recipes_of_artifacts(paths))
    if not (opts.base or opts.trained_on or opts.double_quant):  # merged as recorded: the control can reuse it
        opts = replace(opts, merged_dir=merged_of_artifacts(Path(adapter), paths))
    report = check(adapter, list(artifacts), opts)
    click.echo(to_markdown(report))
    if not report.passed:
        from exporter.errors import GateFailed

        failed = [t.name for t in report.targets if t.gated and not t.passed]
        raise GateFailed(f"parity gate failed for {', '.join(failed)}")
