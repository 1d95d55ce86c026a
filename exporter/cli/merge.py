"""`lorax merge ADAPTER --out DIR`: fold an adapter into full weights, exactly as the base was trained.

    lorax merge adapter/ --out merged/
    lorax merge adapter/ --out merged/ --merge-base auto --dtype float32
    lorax merge peft_adapter/ --out merged/ --trained-on nf4 --double-quant --base base_model/
"""

from __future__ import annotations

import click

MERGE_BASES = ("auto", "quantized", "original")
DTYPES = ("float32", "bfloat16", "float16")
TRAINED_ON = ("nf4", "fp4", "none")


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MB")


@click.command("merge")
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output HF model directory.")
@click.option("--merge-base", type=click.Choice(MERGE_BASES), default=None,
              help="Fold into the base as quantized in training (default for QLoRA adapters), the original "
                   "weights, or auto: build both and keep the one closer to the trained model.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Output dtype [default: the dtype training computed in, so the merge is exact].")
@click.option("--trained-on", type=click.Choice(TRAINED_ON), default=None,
              help="For adapters without lorax.json: how the base was quantized in training (required there).")
@click.option("--double-quant", is_flag=True, help="With --trained-on nf4/fp4: training used double quantization.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), default=None,
              help="Base model directory [default: the one recorded in the adapter].")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--no-verify-base", is_flag=True, help="Skip checking the base's sha256 against lorax.json.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def command(adapter_dir: str, out_dir: str, merge_base: str | None, dtype: str | None, trained_on: str | None,
            double_quant: bool, base_dir: str | None, max_shard_size: str, no_verify_base: bool, force: bool) -> None:
    """Fold a LoRA adapter into full weights (sharded safetensors + tokenizer + lorax.json)."""
    import json

    from exporter.merge.plan import merge_adapter

    out = merge_adapter(adapter_dir, out_dir, merge_base=merge_base, dtype=dtype, trained_on=trained_on,
                        double_quant=double_quant, base_dir=base_dir, force=force, verify=not no_verify_base,
                        max_shard_bytes=_size(max_shard_size))
    merge = json.loads((out / "lorax.json").read_text())["merge"]
    for name, s in (merge.get("candidates") or {}).items():
        click.echo(f"  {name:9s} vs trained model: mean KLD {s['kld_mean']:.3g}, top-1 {s['top1']:.1%}")
    click.echo(f"merged {adapter_dir} -> {out} (base: {merge['merge_base']}, dtype {merge['dtype']})")
