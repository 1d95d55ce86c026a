"""`lorax merge ADAPTER --out DIR`: fold an adapter into full weights, exactly as the base was trained.

    lorax merge adapter/ --out merged/
    lorax merge adapter/ --out merged/ --merge-base auto --dtype float32
    lorax merge peft_adapter/ --out merged/ --trained-on nf4 --double-quant --base base_model/
"""

from __future__ import annotations

import click

from exporter.cli.options import Size, adapter_options, build, merge_options


@click.command("merge")
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output HF model directory.")
@merge_options
@adapter_options
@click.option("--max-shard-size", "max_shard_bytes", type=Size(), default="5GB", show_default=True,
              help="Largest safetensors shard.")
@click.option("--no-verify-base", is_flag=True, help="Skip checking the base's sha256 against lorax.json.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (never an input).")
def command(adapter_dir: str, out_dir: str, base: str | None, no_verify_base: bool, **flags) -> None:
    """Fold a LoRA adapter into full weights (sharded safetensors + tokenizer + lorax.json)."""
    import json

    from exporter.merge.api import MergeOptions, merge_adapter

    opts = build(MergeOptions, flags, base_dir=base, verify=not no_verify_base)
    out = merge_adapter(adapter_dir, out_dir, opts)
    merge = json.loads((out / "lorax.json").read_text())["merge"]
    for name, s in (merge.get("candidates") or {}).items():
        click.echo(f"  {name:9s} vs trained model: mean KLD {s['kld_mean']:.3g}, top-1 {s['top1']:.1%}")
    click.echo(f"merged {adapter_dir} -> {out} (base: {merge['merge_base']}, dtype {merge['dtype']})")
