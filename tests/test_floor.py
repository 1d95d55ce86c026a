"""The quantization floor and its lossless control (exporter.gate.floor).

The floor may only explain rounding. Each whole-writer bug is planted in the writer itself (no undo), so the
target, the control and the floor's file are all built with it, as a real converter bug would build them; the
control, measured against the trained model (no shared code), must fail the lossy target anyway."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from exporter.cli.main import main
from exporter.gate import registry
from exporter.gate.floor import relax

FLOOR = {"kld_mean": 0.19, "kld_p99": 3.6, "top1": 0.85, "ppl_ratio": 1.01}
LOSSY = [("gguf", "q8_0"), ("gguf", "q4_k_m"), ("onnx", "int4")]


def test_relax_takes_the_worse_of_table_and_floor_up_to_the_cap():
    table = {"kld_mean": 0.15, "kld_p99": 1.5, "top1": 0.80, "ppl_ratio": 1.30, "task_accuracy_drop": 0.05}
    out = relax(table, FLOOR, fixed=set())
    assert out["kld_mean"] == pytest.approx(0.19 * 1.25) and out["kld_p99"] == pytest.approx(3.6 * 1.5)
    assert out["top1"] == 0.80  # the table is already looser than floor - 0.02
    assert out["ppl_ratio"] == 1.30 and out["task_accuracy_drop"] == 0.05
    assert relax(table, {"kld_mean": 0.01}, fixed=set())["kld_mean"] == 0.15  # never tighter than the table
    assert relax(table, FLOOR, fixed={"kld_mean"})["kld_mean"] == 0.15  # the user's limit stands
    # a floor that says "this type destroys the model" is capped (exporter.gate.thresholds.FLOOR_CAP)
    huge = relax(table, {"kld_mean": 2.7, "kld_p99": 40.0, "top1": 0.40, "ppl_ratio": 3.0}, fixed=set())
    assert huge == {**table, "kld_mean": pytest.approx(0.30), "kld_p99": pytest.approx(6.0),
                    "top1": pytest.approx(0.70), "ppl_ratio": pytest.approx(1.625)}


@pytest.fixture(scope="module")
def adapter(nf4_adapter) -> Path:
    return nf4_adapter


@pytest.fixture
def floor_decides(monkeypatch):
    """A mean-KLD limit no lossy file meets, so each verdict rests on the floor (and so on its control).
    top-1 is set aside: the random tiny model's next-token distributions are nearly flat, so any rounding
    flips ~10% of near-tied argmaxes (q8_0 here 0.91, its own floor 0.96); SmolLM2 gates top-1 for real.
    The cap on mean KLD is lifted (it is relative to the table's limit, here ~0): what stops a broken file
    below is the control alone; the cap has its own test above."""
    from exporter.gate import thresholds

    monkeypatch.setitem(thresholds.FLOOR_CAP, "kld_mean", ("x", float("inf")))
    for key in LOSSY:
        row = registry.TYPES[key]
        monkeypatch.setitem(registry.TYPES, key, dataclasses.replace(
            row, limits={**row.limits, "kld_mean": 1e-12, "top1": 0.5}))


def _export(adapter: Path, out: Path, *flags: str) -> tuple[int, dict]:
    rc = main(["export", str(adapter), "--out", str(out), "--gen-tokens", "4", "--max-samples", "2", *flags])
    report = json.loads((out / "report.json").read_text())
    return rc, {t["dtype"]: t for t in report["targets"]}


GGUF = ("--gguf", "--quant", "q8_0", "--quant", "q4_k_m")
ONNX = ("--onnx", "--onnx-quant", "int4")


def test_floor_explains_honest_rounding(adapter, tmp_path, floor_decides):
    rc, by = _export(adapter, tmp_path / "auto", *GGUF)
    lossy = [t for t in by.values() if t["control"] is not None]
    assert rc == 0 and len(lossy) == 2, {k: t["failures"] for k, t in by.items()}
    for t in lossy:
        assert t["control"]["passed"] and t["control"]["metrics"]["kld_mean"] <= 1e-4
        # measured on this tiny model: q8_0 floor ~2e-3, q4_k_m ~0.1 mean KLD
        assert 0 < t["floor"]["kld_mean"] < 0.2, t["floor"]
        assert t["thresholds"]["kld_mean"] == pytest.approx(1.25 * t["floor"]["kld_mean"])
        assert t["metrics"]["kld_mean"] <= t["thresholds"]["kld_mean"]
    md = (tmp_path / "auto" / "report.md").read_text()
    assert "Quantization floor" in md and "Lossless controls" in md
    # the same files with the floor off fail the (impossible) table limit: the floor is what passed them
    rc, by = _export(adapter, tmp_path / "off", *GGUF, "--floor", "off")
    assert rc == 1 and all(t["floor"] is None for t in by.values())


def test_honest_onnx_int4_passes_with_control_and_floor(adapter, tmp_path, monkeypatch):
    """int4 on the table's own row, floor measured anyway. Not floor_decides: on this tiny model with a large
    random LoRA, int4 of the merge loses more than int4 of the base as trained (0.19 vs 0.13 mean KLD), so the
    floor is no proxy here; the table (0.25, q4_0's class) passes it. top-1 is the user's to set here (a
    --threshold is never relaxed): the tiny model's flat distributions give int4 a top-1 of ~0.5."""
    built: list = []
    real = registry.BUILDERS["onnx"]
    monkeypatch.setitem(registry.BUILDERS, "onnx", lambda hf, dtype, work, stem, recipe=None: (
        built.append((stem, dtype)), real(hf, dtype, work, stem, recipe))[1])
    rc, by = _export(adapter, tmp_path / "onnx", *ONNX, "--floor", "always", "--threshold", "top1=0.4")
    t = by["int4"]
    assert rc == 0 and t["passed"], t["failures"]
    assert t["control"]["passed"] and t["control"]["metrics"]["kld_mean"] <= 1e-4
    assert t["floor"] is not None and t["floor"]["kld_mean"] > 0
    # the control is the export's own float32 graph (same writer, same run), measured, not built again;
    # it is the float32 target's file, so their metrics agree
    assert ("control", "float32") not in built and ("floor", "int4") in built, built
    assert t["control"]["metrics"]["kld_mean"] == pytest.approx(by["float32"]["metrics"]["kld_mean"])


def test_onnx_int4_calibrates_gptq_on_the_rows_and_its_floor_too(adapter, tmp_path, monkeypatch, capsys):
    """--calibration gives int4 GPTQ's rows: shipped as dist/calibration.json (token ids), named in lorax.json,
    and the floor's int4 file of the base as trained is quantized from the same rows (its builder gets the
    recipe; a standalone check reads it back from lorax.json). Without rows int4 is the weighted search, as
    onnx/lorax.json says, with other weights."""
    import onnx
    from onnx import numpy_helper
    from tiny_data import chat_records, write_jsonl

    from exporter.export.calibration import read_calibration
    from exporter.export.gguf_build import recipes_from_record

    seen: list = []
    real = registry.BUILDERS["onnx"]
    monkeypatch.setitem(registry.BUILDERS, "onnx", lambda hf, dtype, work, stem, recipe=None: (
        seen.append((stem, dtype, recipe)), real(hf, dtype, work, stem, recipe))[1])
    cal = write_jsonl(chat_records(16), tmp_path / "cal.jsonl")
    rc, by = _export(adapter, tmp_path / "w", *ONNX, "--calibration", str(cal), "--floor", "always",
                     "--threshold", "top1=0.4")
    assert rc == 0, by["int4"]["failures"]
    meta = json.loads((tmp_path / "w" / "lorax.json").read_text())
    assert meta["onnx_recipes"]["int4"]["calibration"] == "calibration.json"
    rows = read_calibration(tmp_path / "w" / "calibration.json")
    assert len(rows) == 16 and meta["onnx_recipes"]["int4"]["calibration_tokens"] == sum(map(len, rows))
    quant = json.loads((tmp_path / "w" / "onnx" / "lorax.json").read_text())["quantization"]
    assert quant["algorithm"] == "gptq" and quant["block_size"] == 32
    floors = [r for stem, dtype, r in seen if stem == "floor" and dtype == "int4"]
    assert floors and floors[0] is not None and floors[0].calibration == rows
    assert recipes_from_record(meta, tmp_path / "w")[registry.recipe_key("onnx", "int4")].calibration == rows
    rc, _ = _export(adapter, tmp_path / "plain", *ONNX, "--floor", "off", "--threshold", "top1=0.4")
    assert rc == 0 and not (tmp_path / "plain" / "calibration.json").exists()
    plain = json.loads((tmp_path / "plain" / "onnx" / "lorax.json").read_text())["quantization"]
    assert plain["algorithm"] == "search" and plain["block_size"] == 16

    def scales(d: Path) -> np.ndarray:
        g = onnx.load(str(d / "onnx" / "onnx" / "model_q4.onnx"))
        return np.concatenate([numpy_helper.to_array(i).ravel() for i in g.graph.initializer
                               if i.name.endswith(".scales")])

    assert scales(tmp_path / "w").size != scales(tmp_path / "plain").size  # blocks of 32 vs 16
    # a standalone `lorax check` of the calibrated export builds its floor file from the export's rows too
    # (lorax.json beside the artifact), not uncalibrated; nothing recalled, so the floor is really built
    seen.clear()
    monkeypatch.setenv("LORAX_REFERENCE_CACHE", "off")
    rc = main(["check", str(adapter), str(tmp_path / "w" / "onnx"), "--gen-tokens", "4", "--max-samples", "2",
               "--floor", "always", "--threshold", "top1=0.4"])
    floors = [r for stem, dtype, r in seen if stem == "floor" and dtype == "int4"]
    assert rc == 0 and floors and floors[0] is not None and floors[0].calibration == rows, seen
    # a damaged calibration file is bad input: one line naming it and the fix, exit 2, nothing measured
    (tmp_path / "w" / "calibration.json").write_text('{"rows": [[1, 2], "x"]')
    rc = main(["check", str(adapter), str(tmp_path / "w" / "onnx"), "--gen-tokens", "4", "--max-samples", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "calibration.json: not a lorax calibration file" in err[-1] and "re-run lorax export" in err[-1]


def _swap_gate_up(spec):
    t = dict(spec.tensors)
    g, u = "model.layers.{bid}.mlp.gate_proj.weight", "model.layers.{bid}.mlp.up_proj.weight"
    t[g], t[u] = t[u], t[g]
    return dataclasses.replace(spec, tensors=t)


def _scaled_hparams(field: str, factor: float):
    from formats.gguf import arch

    real = arch.hparams

    def hparams(cfg):
        hp = real(cfg)
        if field == "rope_theta":
            return dataclasses.replace(hp, rope={**hp.rope, "rope_theta": hp.rope["rope_theta"] * factor})
        return dataclasses.replace(hp, **{field: getattr(hp, field) * factor})

    return hparams


def test_gguf_control_is_the_file_libllama_quantized_from(adapter, tmp_path, monkeypatch, floor_decides):
    """libllama quantizes from an f32 GGUF of the merged weights, written by the same writer in the same run:
    the gate measures that very file as the control (kept beside dist/ until the export ends) instead of
    writing another, and the file is gone afterwards."""
    from exporter.gate.floor import Floor

    built, measured = [], []
    real = registry.BUILDERS["gguf"]
    monkeypatch.setitem(registry.BUILDERS, "gguf", lambda hf, dtype, work, stem, recipe=None: (
        built.append((stem, dtype)), real(hf, dtype, work, stem, recipe))[1])
    real_logits = Floor._logits
    monkeypatch.setattr(Floor, "_logits", lambda self, fmt, path: (measured.append(path),
                                                                   real_logits(self, fmt, path))[1])
    rc, by = _export(adapter, tmp_path / "dist", *GGUF)
    assert rc == 0, {k: t["failures"] for k, t in by.items()}
    assert not [b for b in built if b[0] == "control"], built
    assert ("floor", "q8_0") in built and ("floor", "q4_k_m") in built  # the floor still builds its own
    sources = [p for p in measured if p.name == "intermediate-f32.gguf"]
    assert len(sources) == 1 and sources[0].parent.parent == tmp_path, measured
    assert not sources[0].exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
    for t in (by["q8_0"], by["q4_k_m"]):
        assert t["control"]["type"] == "f32" and t["control"]["passed"]
        assert t["control"]["metrics"]["kld_mean"] <= 1e-4

def test_standalone_check_builds_its_control_from_the_exports_merge(adapter, tmp_path, monkeypatch, capsys):
    """`lorax check ADAPTER dist/model-q8_0.gguf`: dist/merged was merged from this adapter (its lorax.json
    says so by sha256), so the control is written from it instead of merging again; checked against another
    adapter, the same file gets a merge of that adapter. The control is measured, never shipped: the writer
    hashes the export's files (lorax.json records them) but not the control's; and the reference's tokenizer,
    which built the samples, is loaded once."""
    import hashlib

    from adapters import LoraSpec, make_adapter

    import exporter.gate.reference as reference
    import exporter.merge.api as merge_api
    import formats.gguf.export as gguf_export
    from exporter.gate.reference import read_adapter

    _export(adapter, tmp_path / "dist", "--gguf", "--quant", "q8_0")  # q8_0's verdict: the table's, not this test's
    gguf = tmp_path / "dist" / "model-q8_0.gguf"
    record = json.loads((tmp_path / "dist" / "lorax.json").read_text())
    shipped = {a["path"]: a.get("sha256") for a in record["artifacts"]}
    assert shipped["model-q8_0.gguf"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    merges, hashed, tokenizers = [], [], []
    real = merge_api.merge_adapter
    monkeypatch.setattr(merge_api, "merge_adapter", lambda src, out, opts=None: (
        merges.append((Path(src), opts.adapter_weights)), real(src, out, opts))[1])
    real_sha, real_tok = gguf_export.sha256_file, reference.load_tokenizer
    monkeypatch.setattr(gguf_export, "sha256_file", lambda p, *a: (hashed.append(Path(p).name), real_sha(p, *a))[1])
    monkeypatch.setattr(reference, "load_tokenizer", lambda info: (tokenizers.append(info), real_tok(info))[1])
    args = ["check", "--max-samples", "2", "--gen-tokens", "4", "--floor", "off", "--fresh-reference"]
    main([*args, str(adapter), str(gguf), "--report", str(tmp_path / "r")])
    (row,) = json.loads((tmp_path / "r" / "report.json").read_text())["targets"]
    assert merges == [] and row["control"]["passed"], (merges, row["control"])
    assert row["control"]["metrics"]["kld_mean"] <= 1e-4
    assert hashed == [] and len(tokenizers) == 1, (hashed, tokenizers)
    other = tmp_path / "other"
    make_adapter(read_adapter(adapter).base_dir, other, trained_on="nf4", double_quant=True, spec=LoraSpec(seed=7))
    main([*args, str(other), str(gguf)])  # its verdict does not matter here: another model
    assert merges and all(src == other and with_lora for src, with_lora in merges), merges


def _plant(monkeypatch, bug: str) -> None:
    """Break the writer itself for the rest of the test: every file it writes carries the bug."""
    from formats.gguf import arch

    if bug == "qk_unpermuted":
        monkeypatch.setitem(arch.ARCHS, "llama", dataclasses.replace(arch.ARCHS["llama"], permute_qk=False))
    elif bug == "gate_up_swapped":
        monkeypatch.setitem(arch.ARCHS, "llama", _swap_gate_up(arch.ARCHS["llama"]))
    elif bug == "rope_theta_x0.25":
        monkeypatch.setattr(arch, "hparams", _scaled_hparams("rope_theta", 0.25))
    elif bug == "rms_eps_x1e4":
        monkeypatch.setattr(arch, "hparams", _scaled_hparams("rms_eps", 1e4))
    elif bug == "onnx_attention_scale_x2":
        from formats.onnx import decoder

        real_init = decoder.DecoderWithCache.__init__

        def init(self, model):
            for layer in model.model.layers:
                layer.self_attn.scaling *= 2.0
            real_init(self, model)

        monkeypatch.setattr(decoder.DecoderWithCache, "__init__", init)
        # the same bug in the GroupQueryAttention graph's writer (the llama family's, formats/onnx/gqa.py)
        from formats.onnx import gqa

        real_pad_aware = gqa.pad_aware

        def pad_aware(model):
            real_pad_aware(model)
            for node in model.graph.node:
                for a in node.attribute:
                    if node.op_type == "GroupQueryAttention" and a.name == "scale":
                        a.f *= 2.0

        monkeypatch.setattr(gqa, "pad_aware", pad_aware)
    else:
        raise AssertionError(bug)


BUGS = [("qk_unpermuted", GGUF), ("gate_up_swapped", GGUF), ("rope_theta_x0.25", GGUF), ("rms_eps_x1e4", GGUF),
        ("onnx_attention_scale_x2", ONNX)]


@pytest.mark.parametrize("mode", ["auto", "always"])
@pytest.mark.parametrize(("bug", "flags"), BUGS, ids=[b for b, _ in BUGS])
def test_whole_writer_bug_fails_despite_the_floor(adapter, tmp_path, monkeypatch, floor_decides, bug, flags, mode):
    _plant(monkeypatch, bug)
    rc, by = _export(adapter, tmp_path / "dist", *flags, "--floor", mode)
    lossy = [t for t in by.values() if t["control"] is not None]
    assert rc == 1 and len(lossy) == (2 if flags is GGUF else 1)
    for t in lossy:
        assert not t["passed"] and not t["control"]["passed"], t
        assert any(f.startswith("control ") and "kld_mean" in f for f in t["failures"]), t["failures"]
        assert t["floor"] is None  # no floor was allowed to relax anything


def test_unknown_or_ungated_types_are_refused_before_anything_is_written(adapter, tmp_path, capsys):
    for q in ("q5_1", "q2_k", "iq1_s", "q4_k_x"):
        out = tmp_path / q
        assert main(["export", str(adapter), "--out", str(out), "--gguf", "--quant", q]) == 2
        err = capsys.readouterr().err
        assert "q4_k_m" in err and "q8_0" in err, err  # the supported list
        assert not out.exists()


def test_every_offered_type_has_a_row_with_its_basis():
    from exporter.cli import export as export_cmd
    from exporter.gate.thresholds import HIGHER_IS_BETTER, limits_for
    from formats.gguf.quantize import LIBLLAMA_TYPES
    from formats.gguf.writer import DIRECT_TYPES

    gguf = registry.offered("gguf")
    # "auto" is not a type: it ships one of the offered types (exporter.export.quant_recipes.auto_pool), gated by its row
    assert set(export_cmd.QUANTS.choices) == set(gguf) | {"auto"}
    assert set(gguf) <= set(DIRECT_TYPES) | set(LIBLLAMA_TYPES)  # each has a writer
    assert set(export_cmd.ONNX_QUANTS) == {"int8", "int4"}
    for (fmt, name), row in registry.TYPES.items():
        assert row.basis and row.limits and set(row.limits) <= set(HIGHER_IS_BETTER), (fmt, name)
        assert limits_for(fmt, name) == row.limits
        if row.quantized:
            assert fmt in registry.BUILDERS and {"kld_mean", "top1"} <= set(row.limits)


def test_int4_quantizer_packing_fault_fails_the_gate_though_the_floor_carries_it(adapter, tmp_path, monkeypatch):
    """A fault inside lorax's int4 writer (4-bit codes packed high nibble first), so the shipped file and the
    floor's file both carry it: the target fails on KLD, its float32 control passes (no quantizer involved), and
    the floor cannot excuse it past FLOOR_CAP."""
    from formats.onnx import blockquant

    real = blockquant.pack_codes

    def swapped(codes, bits):
        out = real(codes, bits)
        return out if bits == 8 else ((out >> 4) | (out << 4)).astype(np.uint8)

    monkeypatch.setattr(blockquant, "pack_codes", swapped)
    rc, by = _export(adapter, tmp_path / "bad", *ONNX, "--floor", "always", "--threshold", "top1=0.4")
    t = by["int4"]
    assert rc == 1 and not t["passed"], t
    assert any("kld_mean" in f for f in t["failures"]), t["failures"]
    assert t["control"]["passed"] and t["control"]["metrics"]["kld_mean"] <= 1e-4


def test_check_refuses_artifacts_of_two_exports_that_quantized_one_type_differently(tmp_path):
    """A standalone check's floor builds each type with its export's recipe (lorax.json beside the artifact);
    one floor cannot stand for two recipes of the same type, so mixing such exports is refused, by name."""
    from exporter.errors import LoraxError
    from exporter.export.gguf_build import recipes_of_artifacts

    paths = []
    for name, bump in (("a", "q6_k"), ("b", "q8_0")):
        d = tmp_path / name
        d.mkdir()
        art = {"path": "model-q4_k_m.gguf", "kind": "model", "format": "gguf", "type": "q4_k_m",
               "recipe": {"imatrix": None, "tensor_types": [f"ffn_gate={bump}"]}}
        (d / "lorax.json").write_text(json.dumps({"kind": "export", "artifacts": [art]}))
        (d / "model-q4_k_m.gguf").write_bytes(b"GGUF")
        paths.append(d / "model-q4_k_m.gguf")
    assert recipes_of_artifacts(paths[:1])["q4_k_m"].tensor_types == (("ffn_gate", "q6_k"),)
    with pytest.raises(LoraxError, match="q4_k_m was quantized differently"):
        recipes_of_artifacts(paths)
