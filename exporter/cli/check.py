"""`lorax check ADAPTER ARTIFACT...`: exit 1 when any artifact drifts past its threshold."""

from __future__ import annotations

import click


@click.command("check")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--base", type=click.Path(exists=True, file_okay=False),
              help="Base model dir, for adapters without lorax.json (default: the one recorded).")
@click.option("--trained-on", type=click.Choice(["nf4", "fp4", "none"]),
              help="Quantization the adapter was trained on (required for adapters without lorax.json).")
@click.option("--double-quant", is_flag=True, help="With --trained-on nf4/fp4: training used double quantization.")
@click.option("--lora", type=click.Path(exists=True, dir_okay=False),
              help="A llama.cpp LoRA GGUF to apply to every GGUF artifact (e.g. dist/model-lora-f32.gguf over "
                   "dist/base-as-trained-f32.gguf); the report also shows it over the original base, ungated.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="JSONL prompts (messages / prompt+completion / text). Default: the adapter's eval.jsonl.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json, report.md and kld.svg here.")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Greedy tokens compared per prompt.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most this many prompts.")
@click.option("--threshold", "thresholds", multiple=True, metavar="METRIC=VALUE",
              help="Override a limit for every target (e.g. kld_mean=0.2, or =none to ungate).")
@click.option("--thresholds", "thresholds_yaml", type=click.Path(exists=True, dir_okay=False),
              help="YAML mapping metric: limit, applied to every target (flags win).")
@click.option("--floor", type=click.Choice(["auto", "always", "off"]), default="auto", show_default=True,
              help="Quantization floor for lossy GGUF/ONNX types: when a table limit fails, measure the same type "
                   "on the base as trained and allow up to that loss (auto); always measure; or never.")
def command(adapter, artifacts, base, trained_on, double_quant, lora, prompts, report_dir, gen_tokens, max_samples,
            thresholds, thresholds_yaml, floor) -> None:
    """Compare each ARTIFACT (GGUF file, ONNX dir, merged HF dir) with the model as trained.

    Lossy types (GGUF q8_0..q4_0, ONNX int8/int4) also get a lossless control: the same writer's exact file
    of the same merged weights, held to the lossless limits; a quantization floor can only relax a limit
    when that control passed, and never past the cap in exporter/gate/thresholds.py."""
    from exporter.errors import LoraxError
    from exporter.gate.check import GateOptions, check
    from exporter.gate.preflight import check_artifacts, check_thresholds_yaml
    from exporter.gate.report import to_markdown
    from exporter.gate.thresholds import parse_overrides
    from lorax_common.outputs import check_writable_dir

    # bad inputs and an unwritable --report fail now, not after the whole gate ran
    if report_dir:
        check_writable_dir(report_dir, "--report")
    check_thresholds_yaml(thresholds_yaml)
    check_artifacts(list(artifacts))
    try:
        overrides = parse_overrides(thresholds, thresholds_yaml)
    except ValueError as e:
        raise LoraxError(str(e)) from None
    opts = GateOptions(base=base, trained_on=trained_on, double_quant=double_quant, prompts=prompts,
                       report_dir=report_dir, gen_tokens=gen_tokens, max_samples=max_samples, overrides=overrides,
                       floor=floor, lora=lora)
    report = check(adapter, list(artifacts), opts)
    click.echo(to_markdown(report))
    if not report.passed:
        from exporter.errors import GateFailed

        failed = [t.name for t in report.targets if t.gated and not t.passed]
        raise GateFailed(f"parity gate failed for {', '.join(failed)}")
