"""`--quant auto`: candidates measured on held-out data, the smallest within budget shipped, every one reported;
and `--imatrix auto` computing the matrix from the adapter's recorded training data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from adapters import LoraSpec, make_adapter
from gguf import GGUFReader
from tiny_data import chat_records, write_jsonl

from exporter.cli.main import main
from exporter.errors import LoraxError
from exporter.export.quant_auto import Candidate, Measured, choose
from formats.gguf.imatrix import read_imatrix
from lorax_common.units import parse_size


def m(name: str, size: int, kld: float) -> Measured:
    return Measured(Candidate(name), size, {"kld_mean": kld, "top1": 0.9})


def test_choose_smallest_within_budget():
    pool = [m("q6_k", 300, 0.01), m("q4_k_m", 200, 0.09), m("q4_0", 150, 0.2), m("q5_k_m", 250, 0.05)]
    assert choose(pool, max_kld=0.1).candidate.name == "q4_k_m"
    assert choose(pool, max_kld=0.05).candidate.name == "q5_k_m"  # the limit itself is within budget
    assert choose(pool, max_size=260).candidate.name == "q5_k_m"  # size only: lowest KLD that fits
    assert choose(pool, max_kld=0.3, max_size=199).candidate.name == "q4_0"
    with pytest.raises(LoraxError, match="closest is q6_k: 300 bytes, mean KLD 0.0100"):
        choose(pool, max_kld=0.001)
    with pytest.raises(LoraxError, match="needs a budget"):
        choose(pool)
    assert parse_size("110MB") == 110_000_000 and parse_size("1.5KiB") == 1536 and parse_size("42") == 42
    for bad in ("12XB", "MB", "-3MB", "1.2.3GB"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


@pytest.fixture(scope="module")
def adapter_with_data(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("auto")
    ad = root / "adapter"
    make_adapter(tiny_model_dir, ad, trained_on="nf4", double_quant=True, spec=LoraSpec(seed=0))
    data = write_jsonl(chat_records(64), root / "train.jsonl")
    meta = json.loads((ad / "lorax.json").read_text())
    meta["data"].update(path=str(data), eval_fraction=0.1)
    (ad / "lorax.json").write_text(json.dumps(meta))
    return ad


def test_quant_auto_ships_the_smallest_candidate_under_the_budget(adapter_with_data, tmp_path):
    out = tmp_path / "dist"
    rc = main(["export", str(adapter_with_data), "--out", str(out), "--gguf", "--quant", "auto", "--max-kld", "0.2",
               "--max-samples", "3", "--floor", "off"])
    assert rc in (0, 1)  # the tiny random model may fail a q4 row; the choice is what is tested here
    rec = json.loads((out / "lorax.json").read_text())
    auto = rec["quant_auto"]
    rows = auto["candidates"]
    assert len(rows) >= 6 and {r["name"] for r in rows} >= {"q4_k_m", "q4_k_m+imatrix", "q6_k"}
    within = [r for r in rows if r["kld_mean"] <= 0.2]
    best = min(within, key=lambda r: (r["bytes"], r["kld_mean"]))
    assert auto["chosen"] == best["name"]
    assert all(r["bytes"] >= best["bytes"] for r in within)
    shipped = [a for a in rec["artifacts"] if a["kind"] == "model" and a["format"] == "gguf"]
    assert [a["type"] for a in shipped] == [best["type"]]
    assert (out / shipped[0]["path"]).stat().st_size == best["bytes"]  # the measured file is the shipped one
    md = (out / "report.md").read_text()
    assert "Quantization candidates" in md and all(f"| {r['name']} |" in md for r in rows)
    assert (out / "quant.svg").read_text().count("<circle") == len(rows)
    if "imatrix" in best["name"]:
        assert shipped[0]["recipe"]["imatrix"] == "imatrix.gguf"
        assert read_imatrix(out / "imatrix.gguf").tokens > 0


def test_imatrix_auto_uses_the_training_rows_and_floor_uses_it(adapter_with_data, tmp_path, monkeypatch):
    import exporter.gate.floor as floor_mod

    seen = {}
    real = floor_mod.Floor.measure

    def spy(self, fmt, dtype, ref_key=None):
        seen[dtype] = self.recipes.get(dtype)
        return real(self, fmt, dtype, ref_key)

    monkeypatch.setattr(floor_mod.Floor, "measure", spy)
    out = tmp_path / "dist"
    main(["export", str(adapter_with_data), "--out", str(out), "--gguf", "--quant", "q4_k_m", "--max-samples", "3",
          "--floor", "always", "--imatrix-tokens", "500"])
    rec = json.loads((out / "lorax.json").read_text())
    art = next(a for a in rec["artifacts"] if a["type"] == "q4_k_m")
    assert art["recipe"]["imatrix"] == "imatrix.gguf" and art["recipe"]["imatrix_tokens"] == 500
    imx = read_imatrix(out / "imatrix.gguf")
    assert imx.tokens == 500 and imx.datasets == [str(Path(json.loads(
        (adapter_with_data / "lorax.json").read_text())["data"]["path"]))]
    names = {t.name for t in GGUFReader(str(out / "imatrix.gguf")).tensors}
    assert "blk.0.ffn_down.weight.in_sum2" in names
    # the floor's q4_k_m was quantized with the same matrix as the shipped one
    assert seen["q4_k_m"] is not None and seen["q4_k_m"].imatrix is not None
    assert seen["q4_k_m"].imatrix.values().keys() == imx.values().keys()
    # and with the shipped file's tensor overrides, as lorax.json records them
    assert [f"{p}={t}" for p, t in seen["q4_k_m"].tensor_types] == art["recipe"]["tensor_types"] != []
    shutil.rmtree(out)


def test_iquants_are_gated_with_their_matrix_and_refused_without_one(adapter_with_data, tmp_path, capsys):
    """An i-quant ships with the fine-tune's matrix and its own gate row (floor quantized the same way);
    asking for one that needs a matrix with --imatrix off is one line, exit 2, nothing written."""
    out = tmp_path / "nomatrix"
    rc = main(["export", str(adapter_with_data), "--out", str(out), "--gguf", "--quant", "iq3_xxs", "--imatrix", "off"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "--quant iq3_xxs needs an importance matrix" in err[0]
    out = tmp_path / "dist"
    rc = main(["export", str(adapter_with_data), "--out", str(out), "--gguf", "--quant", "iq4_xs", "--max-samples",
               "3", "--floor", "always"])
    assert rc in (0, 1)  # a tiny random model may fail a 4-bit row; the row and the recipe are what is tested
    rec = json.loads((out / "lorax.json").read_text())
    art = next(a for a in rec["artifacts"] if a["kind"] == "model")
    assert art["type"] == "iq4_xs" and art["recipe"]["imatrix"] == "imatrix.gguf"
    r = json.loads((out / "report.json").read_text())
    row = next(t for t in r["targets"] if t["name"].endswith("iq4_xs.gguf"))
    assert row["thresholds"]["kld_mean"] > 0 and row["floor"]["kld_mean"] > 0 and row["control"]["passed"]
    assert GGUFReader(str(out / "model-iq4_xs.gguf")).fields["general.file_type"].contents() == 30  # IQ4_XS
