"""`lorax baseline save|compare`: golden outputs of an artifact and the drift of a new build."""

from __future__ import annotations

import json

import click


def _tokenizer_for(artifact: str, tokenizer_dir: str | None):
    from pathlib import Path

    from transformers import AutoTokenizer

    from exporter.errors import LoraxError
    from exporter.gate.targets import onnx_dir

    p = Path(artifact)
    for cand in ([tokenizer_dir] if tokenizer_dir else []) + [p if p.is_dir() else None, onnx_dir(p) if p.is_dir() else None]:
        if cand and (Path(cand) / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(cand)
    raise LoraxError(f"{artifact}: no tokenizer files next to it; pass --tokenizer DIR (e.g. the merged model dir)")


@click.group("baseline")
def command() -> None:
    """Save golden outputs of an artifact; compare a later build against them (exit 1 on drift)."""


@command.command("save")
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False),
              help="HF dir whose tokenizer/chat template renders the prompts (default: the artifact's own).")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), default=None)
@click.option("--force", is_flag=True, help="Replace an existing baseline file.")
def save_cmd(artifact, prompts, out_path, tokenizer_dir, gen_tokens, max_samples, force) -> None:
    from exporter.gate.preflight import check_artifacts
    from formats.fsutil import refuse_existing
    from lorax_common.outputs import output_lock, refuse_overlap

    refuse_overlap(out_path, [artifact, prompts, tokenizer_dir])  # --force replaces the baseline, never an input
    refuse_existing(out_path, force)  # before the artifact runs, not after
    check_artifacts([artifact])
    with output_lock(out_path) as lock:
        _save(artifact, prompts, out_path, tokenizer_dir, gen_tokens, max_samples, force, lock)


def _save(artifact, prompts, out_path, tokenizer_dir, gen_tokens, max_samples, force, lock) -> None:
    from exporter.gate import baseline
    from exporter.gate.samples import build, load_rows
    from exporter.gate.targets import open_target
    from formats.fsutil import atomic_file

    rows, _ = load_rows(prompts)
    samples = build(rows, _tokenizer_for(artifact, tokenizer_dir), max_samples=max_samples)
    runner = open_target(artifact).open()
    try:
        data = baseline.save(runner, samples, str(artifact), gen_tokens)
    finally:
        runner.close()
    # how the samples were chosen, so compare --prompts rebuilds exactly these
    data["selection"] = {"prompts": str(prompts), "max_samples": max_samples, "tokenizer": tokenizer_dir}
    with atomic_file(out_path, force=force, lock=lock) as tmp:
        tmp.write_text(json.dumps(data) + "\n")
    click.echo(f"baseline of {artifact}: {len(samples)} sequences, {sum(len(s.ids) for s in samples)} tokens "
               f"-> {out_path}")


@command.command("compare")
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--baseline", "baseline_path", required=True, type=click.Path(dir_okay=False))
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="Check the baseline was made with these prompts.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--threshold", "thresholds", multiple=True, metavar="METRIC=VALUE")
def compare_cmd(artifact, baseline_path, prompts, tokenizer_dir, thresholds) -> None:
    from exporter.errors import GateFailed
    from exporter.gate import baseline
    from exporter.gate.preflight import check_artifacts
    from exporter.gate.samples import build, load_rows
    from exporter.gate.thresholds import violations

    data = baseline.load(baseline_path)
    limits = baseline.drift_limits(thresholds)  # a bad --threshold fails before the artifact runs
    check_artifacts([artifact])
    samples = None
    if prompts:
        rows, _ = load_rows(prompts)
        chosen = data.get("selection") or {}
        samples = build(rows, _tokenizer_for(artifact, tokenizer_dir or chosen.get("tokenizer")),
                        max_samples=chosen.get("max_samples"))
    drift = baseline.drift_of(data, artifact, samples)
    failures = violations(drift.metrics, limits)
    click.echo(json.dumps({"artifact": str(artifact), "baseline": str(baseline_path), "metrics": drift.metrics,
                           "thresholds": limits, "baseline_versions": data.get("versions"),
                           "passed": not failures, "failures": failures}, indent=2))
    if failures:
        raise GateFailed(f"{artifact} drifted from {baseline_path}: {'; '.join(failures)}")
