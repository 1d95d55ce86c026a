"""pytest plugin (entry point `pytest11: lorax`): one test item per shipped file and one per baseline.

    pytest dist/ baselines/ --junitxml=report.xml          # a pass/fail row per file in the CI's test view
    pytest dist/ --lorax-adapter path/to/adapter            # the adapter moved since the export

A `lorax.json` of kind "export" (dist/) collects one item per artifact its report.json gated: the gate runs
again (reference once, every artifact), and each item passes or fails on the thresholds recorded in
report.json at export time (the floor-relaxed ones included), naming the violated metrics. The reference
needs the adapter the export recorded (or --lorax-adapter); without it the items fail and say so.
A baseline JSON (`lorax baseline save`) collects one item: drift of its artifact against the golden outputs,
with `lorax baseline compare`'s limits. Nothing heavy is imported until an item runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lorax", "lorax parity and drift checks")
    group.addoption("--lorax-adapter", default=None, help="Adapter dir for dist/ items (default: the recorded one).")
    group.addoption("--lorax-threshold", action="append", default=[], metavar="METRIC=VALUE",
                    help="Drift limit for baseline items (as `lorax baseline compare --threshold`).")


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix != ".json":
        return None
    if file_path.name == "lorax.json":
        data = _json(file_path)
        if data and data.get("kind") == "export":
            return DistFile.from_parent(parent, path=file_path)
        return None
    if file_path.name in ("report.json",) or file_path.stat().st_size > 512 * 2**20:
        return None
    data = _json(file_path)
    if data and "format_version" in data and "sequences" in data and "artifact" in data:
        return BaselineFile.from_parent(parent, path=file_path)
    return None


class LoraxFailure(Exception):
    """A failed parity or drift check: the message names each violated metric."""


class LoraxItem(pytest.Item):
    """An item whose failure is one line naming the violated metrics, not a traceback."""

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, LoraxFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


class DistFile(pytest.File):
    """dist/lorax.json: one item per artifact gated at export."""

    def collect(self):
        report = _json(self.path.parent / "report.json") or {}
        if not report.get("targets"):
            yield DistItem.from_parent(self, name="gate", target=None)
            return
        for t in report["targets"]:
            if t.get("gated", True):
                yield DistItem.from_parent(self, name=t["name"], target=t)

    def run_gate(self) -> dict[str, Any]:
        """The gate over every artifact once per dist/ (the reference is the expensive part)."""
        if not hasattr(self, "_results"):
            self._results = _regate(self.path.parent, self.config.getoption("lorax_adapter"))
        return self._results


def _regate(dist: Path, adapter_opt: str | None) -> dict[str, Any]:
    from exporter.gate.check import GateOptions, check

    meta, report = _json(dist / "lorax.json") or {}, _json(dist / "report.json") or {}
    adapter = Path(adapter_opt or meta.get("source", ""))
    if not adapter.is_dir():
        raise LoraxFailure(f"the adapter this dist/ was gated against ({adapter}) is not here, and lorax keeps no "
                           "reference outputs that would stand in for it; pass --lorax-adapter DIR")
    prompts = report.get("prompts")
    prompts = prompts if prompts and Path(prompts).is_file() else None
    artifacts = [dist / t["path"] for t in report["targets"] if t.get("gated", True)]
    lora = next((dist / a["path"] for a in meta.get("artifacts", []) if a.get("kind") == "lora"), None)
    from exporter.gate.targets import open_target

    bases = {dist / a["path"] for a in meta.get("artifacts", []) if a.get("kind") == "base"}
    targets = [open_target(p, lora if p in bases else None) for p in artifacts]
    merged = dist / "merged" if (dist / "merged" / "config.json").is_file() else None
    again = check(adapter, targets, GateOptions(prompts=prompts, max_samples=report.get("samples"),
                                                gen_tokens=report.get("gen_tokens", 16), floor="off",
                                                merged_dir=merged))
    return {t.name: t for t in again.targets}


class DistItem(LoraxItem):
    def __init__(self, *, target: dict | None, **kw) -> None:
        super().__init__(**kw)
        self.target = target

    def runtest(self) -> None:
        from exporter.gate.thresholds import violations

        if self.target is None:
            raise LoraxFailure(f"{self.path.parent}/report.json has no gated targets: the export's gate never "
                               "ran; run `lorax export` again with the same flags to finish it")
        result = self.parent.run_gate()[self.target["name"]]
        failures = [f for f in result.failures if not _is_metric(f)]  # errors, tokenizer, vocab
        failures += violations(result.metrics, self.target["thresholds"])
        if failures:
            raise LoraxFailure(f"{self.name}: " + "; ".join(failures))

    def reportinfo(self):
        return self.path, None, f"lorax parity: {self.name}"


def _is_metric(failure: str) -> bool:
    from exporter.gate.thresholds import HIGHER_IS_BETTER

    return failure.split(" ", 1)[0] in HIGHER_IS_BETTER


class BaselineFile(pytest.File):
    def collect(self):
        yield BaselineItem.from_parent(self, name=f"drift:{Path(_json(self.path)['artifact']).name}")


class BaselineItem(LoraxItem):
    def runtest(self) -> None:
        from exporter.gate import baseline
        from exporter.gate.thresholds import violations

        data = baseline.load(self.path)
        artifact = Path(data["artifact"])
        if not artifact.exists() and (self.path.parent / artifact).exists():
            artifact = self.path.parent / artifact
        drift = baseline.drift_of(data, artifact)
        failures = violations(drift.metrics, baseline.drift_limits(tuple(self.config.getoption("lorax_threshold"))))
        if failures:
            raise LoraxFailure(f"{artifact} drifted from {self.path.name}: {'; '.join(failures)}")

    def reportinfo(self):
        return self.path, None, f"lorax drift: {self.name}"
