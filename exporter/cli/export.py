"""`lorax export SOURCE --out DIR --gguf [--quant T ...] --onnx`: merge, convert, and gate."""

from __future__ import annotations

import click

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
@click.option("--imatrix-tokens", type=click.IntRange(min=1), default=32768, show_default=True,
              help="Token budget of the importance matrix.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Per-tensor GGUF type (regex on GGUF names, as llama-quantize --tensor-type), repeatable.")
@click.option("--output-type", default=None, help="GGUF type of output.weight.")
@click.option("--embedding-type", default=None, help="GGUF type of token_embd.weight.")
@click.option("--max-kld", type=float, default=None, help="--quant auto: largest mean KLD vs the trained model.")
@click.option("--max-size", default=None, help="--quant auto: largest file, e.g. 110MB or 1.2GiB.")
@click.option("--gguf-adapter", is_flag=True, help="Also write the adapter alone as a llama.cpp LoRA GGUF, with the base it was "
              "trained on (base-as-trained-<type>.gguf) to apply it to; the pair is gated in llama.cpp.")
@click.option("--onnx", is_flag=True, help="Write an ONNX decoder with KV cache for onnxruntime.")
@click.option("--onnx-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--onnx-quant", type=click.Choice(ONNX_QUANTS), default=None)
@click.option("--merge-base", type=click.Choice(["quantized", "original", "auto"]), default=None,
              help="What the LoRA is folded into (default: quantized for QLoRA adapters).")
@click.option("--trained-on", type=click.Choice(["nf4", "fp4", "none"]),
              help="Required for adapters without lorax.json.")
@click.option("--double-quant", is_flag=True, help="With --trained-on nf4/fp4: training used double quantization.")
@click.option("--base", type=click.Path(exists=True, file_okay=False), help="Override the recorded base dir.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Merged weights dtype (default: the dtype training computed in, so the merge is exact).")
@click.option("--no-check", is_flag=True, help="Skip the parity gate (not recommended).")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="Gate prompts (default: eval.jsonl).")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Gate on at most this many prompts.")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Greedy tokens compared per prompt.")
@click.option("--threshold", "thresholds", multiple=True, metavar="METRIC=VALUE")
@click.option("--floor", type=click.Choice(["auto", "always", "off"]), default="auto", show_default=True,
              help="Quantization floor of lossy GGUF/ONNX types (see `lorax check --help`).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (never an input: --out may not "
              "overlap the adapter, its base or --prompts).")
def command(source, out_dir, gguf, quants, imatrix, calibration, imatrix_tokens, tensor_types, output_type,
            embedding_type, max_kld, max_size, gguf_adapter, onnx, onnx_dtype, onnx_quant, merge_base, trained_on,
            double_quant, base, dtype, no_check, prompts, max_samples, gen_tokens, thresholds, floor, force) -> None:
    """Merge SOURCE (adapter dir or HF model dir), write GGUF/ONNX into DIR, and gate every artifact.

    Killed during the gate? Run the same command again: DIR's lorax.json says the gate is pending and
    the rerun gates the files already built."""
    from exporter.errors import GateFailed, LoraxError
    from exporter.export.pipeline import ExportOptions, export
    from exporter.export.quant_auto import parse_size
    from exporter.gate.report import to_markdown
    from exporter.gate.thresholds import parse_overrides
    from lorax_common.timing import summary_line

    try:
        overrides = parse_overrides(thresholds, None)
    except ValueError as e:
        raise LoraxError(str(e)) from None
    opts = ExportOptions(gguf=gguf, quants=quants, gguf_adapter=gguf_adapter, onnx=onnx, onnx_dtype=onnx_dtype,
                         onnx_quant=onnx_quant, merge_base=merge_base, trained_on=trained_on,
                         double_quant=double_quant, base=base,
                         dtype=dtype, check=not no_check, prompts=prompts, max_samples=max_samples,
                         gen_tokens=gen_tokens, overrides=overrides, floor=floor, force=force, imatrix=imatrix,
                         calibration=calibration, imatrix_tokens=imatrix_tokens, tensor_types=tensor_types,
                         output_type=output_type, embedding_type=embedding_type, max_kld=max_kld,
                         max_size=parse_size(max_size) if max_size else None)
    report = export(source, out_dir, opts)
    click.echo(f"wrote {out_dir}")
    if report is not None:
        click.echo(to_markdown(report))
        click.echo(f"time: {summary_line(report.timing)}")  # every stage, the gate's rows included
        if not report.passed:
            raise GateFailed(f"parity gate failed; see {out_dir}/report.md")
