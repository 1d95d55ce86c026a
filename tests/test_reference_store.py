"""Reference outputs stored once and reused (issue 18): a second gate of the same build loads no reference
model, measures the same numbers, and any change to what the outputs depend on recomputes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.cli.main import main
from exporter.gate.check import GateOptions, check

METRICS = ("kld_mean", "kld_p99", "top1", "max_abs_logit", "ppl_ratio", "greedy_match")


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "reference-store"
    monkeypatch.setenv("LORAX_REFERENCE_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def merged(nf4_adapter, tmp_path_factory) -> Path:
    from exporter.merge.api import MergeOptions, merge_adapter

    return merge_adapter(nf4_adapter, tmp_path_factory.mktemp("store") / "merged", MergeOptions(progress=False))


def _count_loads(monkeypatch) -> list[int]:
    """Counts how often the reference model is loaded (the expensive step reuse must skip)."""
    import exporter.gate.reference as reference

    loads = [0]
    real = reference.load_reference

    def counted(*args, **kwargs):
        loads[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "load_reference", counted)
    return loads


def test_second_check_reuses_the_outputs_and_measures_the_same(nf4_adapter, merged, store, monkeypatch):
    loads = _count_loads(monkeypatch)
    first = check(nf4_adapter, [merged], GateOptions(floor="off"))
    assert loads[0] == 1 and first.reference_path["outputs"]["reused"] is False
    assert len(list(store.iterdir())) == 1
    second = check(nf4_adapter, [merged], GateOptions(floor="off"))
    assert loads[0] == 1  # no reference model was loaded the second time
    out = second.reference_path["outputs"]
    assert out["reused"] is True and out["key"] == first.reference_path["outputs"]["key"]
    assert second.reference_path["dequantized_once"] == first.reference_path["dequantized_once"]
    (a,), (b,) = first.targets, second.targets
    assert a.passed == b.passed
    for k in METRICS:
        assert a.metrics[k] == b.metrics[k], k  # the very same numbers, not merely close
    assert a.kld_positions == b.kld_positions
    fresh = check(nf4_adapter, [merged], GateOptions(floor="off", reuse_reference=False))
    assert loads[0] == 2 and fresh.reference_path["outputs"]["reused"] is False


def test_the_cli_says_it_reused(nf4_adapter, merged, store, tmp_path, capsys):
    argv = ["check", str(nf4_adapter), str(merged), "--floor", "off", "--report", str(tmp_path / "r")]
    assert main(argv) == 0
    assert "reference: reused" not in capsys.readouterr().err
    assert main(argv) == 0
    assert "lorax: reference: reused the outputs stored" in capsys.readouterr().err
    assert "Reference outputs: reused, stored" in (tmp_path / "r" / "report.md").read_text()
    assert main([*argv, "--fresh-reference"]) == 0
    assert "reference: reused" not in capsys.readouterr().err


def test_any_change_to_what_the_outputs_depend_on_recomputes(nf4_adapter, merged, store, tmp_path, monkeypatch):
    import shutil

    from adapters import LoraSpec, make_adapter

    loads = _count_loads(monkeypatch)
    check(nf4_adapter, [merged], GateOptions(floor="off"))
    # other samples, another greedy window: new keys
    assert check(nf4_adapter, [merged], GateOptions(floor="off", max_samples=2)).reference_path["outputs"]["reused"] is False
    assert check(nf4_adapter, [merged], GateOptions(floor="off", gen_tokens=5)).reference_path["outputs"]["reused"] is False
    assert loads[0] == 3
    # lorax's own code changed (same version string): recomputed, never read from what older code stored
    import exporter.gate.reference_store as rs

    real = rs.code_identity
    monkeypatch.setattr(rs, "code_identity", lambda: "edited checkout")
    assert check(nf4_adapter, [merged], GateOptions(floor="off")).reference_path["outputs"]["reused"] is False
    assert loads[0] == 4
    monkeypatch.setattr(rs, "code_identity", real)
    # a copy of the adapter is the same reference (its files are keyed by content, not by path) ...
    ad = tmp_path / "ad"
    shutil.copytree(nf4_adapter, ad)
    before = check(ad, [merged], GateOptions(floor="off"))
    assert before.reference_path["outputs"]["reused"] is True and before.passed and loads[0] == 4
    # ... but retrained in place (other weights, same file names) it is recomputed and measured against
    # the new weights (the old merged model now drifts)
    base = json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"]
    make_adapter(Path(base), ad, "nf4", double_quant=True, spec=LoraSpec(seed=7))
    after = check(ad, [merged], GateOptions(floor="off"))
    assert after.reference_path["outputs"]["reused"] is False
    assert not after.passed and after.targets[0].metrics["kld_mean"] > 100 * before.targets[0].metrics["kld_mean"]


def test_a_damaged_entry_is_recomputed_not_trusted(nf4_adapter, merged, store, monkeypatch, caplog):
    first = check(nf4_adapter, [merged], GateOptions(floor="off"))
    (entry,) = store.iterdir()
    logits = entry / "logits.npy"
    logits.write_bytes(logits.read_bytes()[: logits.stat().st_size // 2])  # a disk that filled mid-write
    loads = _count_loads(monkeypatch)
    again = check(nf4_adapter, [merged], GateOptions(floor="off"))
    assert loads[0] == 1 and again.reference_path["outputs"]["reused"] is False
    assert "unreadable" in caplog.text
    assert again.targets[0].metrics == first.targets[0].metrics


def test_store_keeps_within_its_budget(store, monkeypatch):
    from exporter.gate import reference_store as rs

    lg = [np.zeros((10, 100), np.float32)]  # 4000 bytes each
    monkeypatch.setenv("LORAX_REFERENCE_CACHE_BYTES", "10000")
    for i in range(4):
        assert rs.save(f"k{i}", lg, [[1, 2]], {}, 1.0) is not None
    assert sorted(p.name for p in store.iterdir()) == ["k2", "k3"]  # the oldest went first
    stored = rs.load("k3")
    assert stored is not None and np.array_equal(stored.logits[0], lg[0]) and stored.generations == [[1, 2]]
    monkeypatch.setenv("LORAX_REFERENCE_CACHE_BYTES", "100")
    assert rs.save("big", lg, [[1]], {}, 1.0) is None  # larger than the whole budget: not stored
    monkeypatch.setenv("LORAX_REFERENCE_CACHE", "off")
    assert rs.store_dir() is None and rs.load("k3") is None


def test_control_and_floor_are_remembered_with_the_outputs(nf4_adapter, merged, store, tmp_path, monkeypatch):
    """A second check of the same GGUF builds no control or floor file and merges nothing: both measurements
    come back from the reference entry, equal to the first run's; a differently named source of the merged
    weights measures afresh."""
    import exporter.gate.registry as registry
    import exporter.merge.api as merge_api
    from formats.gguf.export import GGUFOptions, export_gguf

    gguf = export_gguf(merged, tmp_path / "g", ["q8_0"], GGUFOptions(check_tokenizer=False, progress=False)).files[0].path
    builds, merges = [], []
    real_build, real_merge = registry.build, merge_api.merge_adapter
    monkeypatch.setattr(registry, "build", lambda *a, **k: builds.append(a[2]) or real_build(*a, **k))
    monkeypatch.setattr(merge_api, "merge_adapter", lambda *a, **k: merges.append(a[1]) or real_merge(*a, **k))
    first = check(nf4_adapter, [gguf], GateOptions(floor="always"))
    assert sorted(builds) == ["f32", "q8_0"] and len(merges) == 2  # control, floor; merged + base as trained
    second = check(nf4_adapter, [gguf], GateOptions(floor="always"))
    assert len(builds) == 2 and len(merges) == 2  # nothing built, nothing merged the second time
    (a,), (b,) = first.targets, second.targets
    assert a.control == b.control and a.control["type"] == "f32" and a.control["passed"]
    assert a.floor == b.floor and a.floor["kld_mean"] > 0
    assert a.metrics == b.metrics and a.passed == b.passed
    # weights named otherwise (the merged dir a pipeline gives) are measured afresh, then remembered too
    third = check(nf4_adapter, [gguf], GateOptions(floor="always", merged_dir=merged))
    assert len(builds) == 4 and len(merges) == 3  # control and floor again; only the base as trained merged
    assert third.targets[0].control["metrics"] == a.control["metrics"]  # the same weights, the same numbers
    check(nf4_adapter, [gguf], GateOptions(floor="always", merged_dir=merged))
    assert len(builds) == 4 and len(merges) == 3
    # a new llama.cpp (the drift CI exists for) runs the control and the floor anew: the reference's own
    # outputs do not depend on it, so the entry is reused, but nothing measured in llama.cpp is
    import lorax_common.versions as versions

    real_versions = versions.package_versions
    monkeypatch.setattr(versions, "package_versions", lambda: {**real_versions(), "llama-cpp-python": "9.9.9"})
    fourth = check(nf4_adapter, [gguf], GateOptions(floor="always"))
    assert fourth.reference_path["outputs"]["reused"] is True
    assert len(builds) == 6  # control f32 and floor q8_0 rebuilt
