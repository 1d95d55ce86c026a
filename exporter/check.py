"""`lorax check`: the parity gate as a function the CLI and the export pipeline share.

    lorax check adapter/ dist/model-q8_0.gguf dist/onnx dist/merged --report dist/
"""

from __future__ import annotations

from pathlib import Path

from exporter.errors import GateFailed, LoraxError
from exporter.gate import Report, run_gate
from exporter.report import write_report
from exporter.samples import build, load_rows
from exporter.targets import Target, open_target


def reference_runner(source: str | Path, base: str | Path | None = None, trained_on: str | None = None):
    """The model as trained: for an adapter dir, its base quantized as in training + the adapter;
    for a plain HF model dir, that model itself (float32)."""
    from formats.hf import HFRunner

    source = Path(source)
    if (source / "adapter_config.json").is_file():
        from exporter.reference import read_adapter
        from exporter.reference import reference_runner as adapter_reference

        return adapter_reference(read_adapter(source, trained_on=trained_on, base_dir=base))
    if (source / "config.json").is_file():
        return HFRunner(source, name=f"reference:{source.name}")
    raise LoraxError(f"{source}: neither an adapter dir (adapter_config.json) nor an HF model dir (config.json)")


def check(source: str | Path, artifacts: list[str | Path] | list[Target], *, base=None, trained_on=None,
          prompts=None, report_dir: str | Path | None = None, gen_tokens: int = 16, max_samples: int | None = None,
          overrides: dict | None = None, raise_on_fail: bool = True, floor: str = "auto") -> Report:
    if not artifacts:
        raise LoraxError("no artifacts to check; pass one or more .gguf files, ONNX dirs or HF dirs")
    ref = reference_runner(source, base, trained_on)
    rows, where = load_rows(prompts, source)
    try:
        samples = build(rows, ref.tokenizer, max_samples=max_samples)
    except ValueError as e:
        raise LoraxError(f"{where}: {e}") from None
    targets = [a if isinstance(a, Target) else open_target(a) for a in artifacts]
    # the quantization floor needs a base to quantize: only an adapter reference has one
    probe = None
    if floor != "off" and (Path(source) / "adapter_config.json").is_file():
        from exporter.floor import Floor

        probe = Floor(Path(source), samples, base=base, trained_on=trained_on, mode=floor)
    try:
        report = run_gate(ref, ref.name, targets, samples, ref.tokenizer, where, gen_tokens, overrides, probe)
    except KeyError as e:  # no thresholds for a format/dtype
        raise LoraxError(str(e.args[0])) from None
    finally:
        if probe is not None:
            probe.close()
    if report_dir is not None:
        write_report(report, report_dir)
    if raise_on_fail and not report.passed:
        worst = next(t for t in report.targets if not t.passed)
        raise GateFailed(f"{worst.name} failed: {'; '.join(worst.failures)}"
                         + (f" (report: {Path(report_dir) / 'report.md'})" if report_dir else ""))
    return report
