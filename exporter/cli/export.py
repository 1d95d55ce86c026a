"""`lorax export SOURCE --out DIR --gguf [--quant T ...] --onnx`: merge, convert, and gate."""

from __future__ import annotations

import click

from exporter.cli.options import CountOrAuto, Size, adapter_options, gate_options, merge_options
from exporter.gate.registry import lookup, offered

# every type offered here has a threshold row (exporter.gate.registry); the rest are not offered
QUANTS = click.Choice([*offered("gguf"), "auto"], case_sensitive=False)
ONNX_QUANTS = [t for t in offered("onnx") if lookup("onnx", t).quantized]


@click.command("export")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--gguf", is_flag=True, help="Write GGUF files for llama.cpp.")
@click.option("--quant", "quants", multiple=True, type=QUANTS, help="GGUF type, repeatable (default q8_0); auto: "
              "measure candidates, ship the smallest within --max-kld / --max-size.")
@click.option("--imatrix", default="auto", show_default=True, metavar="auto|off|FILE",
              help="Importance matrix for libllama's quantizer: auto computes it from the training data on the "
              "types where it was measured to help; FILE (a GGUF imatrix) applies it to every quantized type.")
@click.option("--calibration", type=click.Path(exists=True), help="Rows for the importance matrix (default: the "
              "adapter's training data, as lorax.json records it).")
@click.option("--imatrix-tokens", type=CountOrAuto(), default="auto", show_default=True, metavar="N|auto",
              help="Token budget of the importance matrix; auto: 32768 up to ~135M weights, then less as the "
              "model grows (same compute), never under 4096.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Per-tensor GGUF type (regex on GGUF names, as llama-quantize --tensor-type), repeatable.")
@click.option("--output-type", default=None, help="GGUF type of output.weight.")
@click.option("--embedding-type", default=None, help="GGUF type of token_embd.weight.")
@click.option("--max-kld", type=float, default=None, help="--quant auto: largest mean KLD vs the trained model.")
@click.option("--max-size", type=Size(), default=None, help="--quant auto: largest file, e.g. 110MB or 1.2GiB.")
@click.option("--gguf-adapter", is_flag=True, help="Also write the adapter alone as a llama.cpp LoRA GGUF, with the base it was "
              "trained on (base-as-trained-<type>.gguf) to apply it to; the pair is gated in llama.cpp.")
@click.option("--onnx", is_flag=True, help="Write an ONNX decoder with KV cache for onnxruntime.")
@click.option("--onnx-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--onnx-quant", type=click.Choice(ONNX_QUANTS), default=None)
@merge_options
@adapter_options
@click.option("--no-check", is_flag=True, help="Skip the parity gate (not recommended).")
@gate_options
@click.option("--force", is_flag=True, help="Replace an existing output directory (never an input: --out may not "
              "overlap the adapter, its base or --prompts).")
def command(source: str, out_dir: str, no_check: bool, thresholds: tuple[str, ...], **flags) -> None:
    """Merge SOURCE (adapter dir or HF model dir), write GGUF/ONNX into DIR, and gate every artifact.

    Killed during the gate? Run the same command again: DIR's lorax.json says the gate is pending and
    the rerun gates the files already built."""
    from exporter.cli.options import build
    from exporter.errors import GateFailed, LoraxError
    from exporter.export.pipeline import ExportOptions, export
    from exporter.gate.report import to_markdown
    from exporter.gate.thresholds import parse_overrides
    from lorax_common.timing import summary_line

    try:
        overrides = parse_overrides(thresholds, None)
    except ValueError as e:
        raise LoraxError(str(e)) from None
    opts = build(ExportOptions, flags, check=not no_check, overrides=overrides)
    report = export(source, out_dir, opts)
    click.echo(f"wrote {out_dir}")
    if report is not None:
        click.echo(to_markdown(report))
        click.echo(f"time: {summary_line(report.timing)}")  # every stage, the gate's rows included
        if not report.passed:
            raise GateFailed(f"parity gate failed; see {out_dir}/report.md")
