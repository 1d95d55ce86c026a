"""`lorax import-gguf MODEL.gguf --out DIR`: a GGUF causal LM as a Hugging Face model directory."""

from __future__ import annotations

import click

from formats.gguf.importer import DTYPES


@click.command("import-gguf")
@click.argument("gguf_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output HF model directory.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Storage dtype. float32 keeps the dequantized GGUF weights exact.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def command(gguf_file: str, out_dir: str, dtype: str, force: bool) -> None:
    """Turn a GGUF causal LM (llama, mistral, qwen2, qwen3) into an HF dir: safetensors, config, tokenizer."""
    from formats.gguf.importer import import_gguf

    out = import_gguf(gguf_file, out_dir, dtype=dtype, force=force)
    click.echo(f"imported {gguf_file} -> {out}")
