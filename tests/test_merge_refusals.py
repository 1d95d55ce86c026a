"""`lorax merge` refuses bad input with one `error:` line, exit code 2, and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapters import LoraSpec, make_adapter
from safetensors.torch import load_file, save_file

from exporter.cli.main import main


@pytest.fixture(scope="module")
def plain_adapter(tiny_model_dir, tmp_path_factory):
    """A PEFT adapter trained (here: randomized) on the unquantized tiny base, without lorax.json."""
    d = tmp_path_factory.mktemp("plain") / "ad"
    make_adapter(tiny_model_dir, d, "none", spec=LoraSpec(lorax_json=False, target_modules=["q_proj", "v_proj"]))
    return d


@pytest.fixture(scope="module")
def lorax_adapter(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("lorax") / "ad"
    make_adapter(tiny_model_dir, d, "none", spec=LoraSpec(target_modules=["q_proj", "v_proj"]))
    return d


def refuse(capsys, tmp_path, *args: str, match: str) -> str:
    """Run `lorax merge ... --out tmp/out`; assert exit 2, one error line matching, no output or temp dirs."""
    out = tmp_path / "out"
    code = main(["merge", *args, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and match in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "something was written"
    return lines[0]


def test_plain_peft_dir_needs_trained_on(capsys, tmp_path, plain_adapter):
    line = refuse(capsys, tmp_path, str(plain_adapter), match="--trained-on")
    assert "no lorax.json" in line
    assert main(["merge", str(plain_adapter), "--trained-on", "none", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "model.safetensors").exists()


def test_existing_output_needs_force(capsys, tmp_path, lorax_adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert main(["merge", str(lorax_adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "user file" and not (out / "model.safetensors").exists()
    assert main(["merge", str(lorax_adapter), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_shape_mismatch(capsys, tmp_path, plain_adapter, tiny_model_factory):
    other = tiny_model_factory(hidden_size=128, intermediate_size=384)
    refuse(capsys, tmp_path, str(plain_adapter), "--trained-on", "none", "--base", str(other),
           match="shape mismatch at model.layers.0.self_attn.q_proj")


def test_target_module_missing_in_base(capsys, tmp_path, plain_adapter, tiny_model_factory):
    one_layer = tiny_model_factory(num_layers=1)
    refuse(capsys, tmp_path, str(plain_adapter), "--trained-on", "none", "--base", str(one_layer),
           match="target module model.layers.1.self_attn.q_proj is missing")


def test_nan_in_merged_tensor(capsys, tmp_path, lorax_adapter):
    bad = shutil.copytree(lorax_adapter, tmp_path / "bad")
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.self_attn.v_proj.lora_B.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, bad / "adapter_model.safetensors")
    refuse(capsys, tmp_path, str(bad), match="merged tensor model.layers.1.self_attn.v_proj.weight has NaN/Inf")


def test_float16_overflow(capsys, tmp_path, lorax_adapter):
    big = shutil.copytree(lorax_adapter, tmp_path / "big")
    weights = load_file(big / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    weights[key] = torch.full_like(weights[key], 1e6)
    save_file(weights, big / "adapter_model.safetensors")
    refuse(capsys, tmp_path, str(big), "--dtype", "float16", match="overflows float16")


@pytest.mark.parametrize("kind", ["dora", "loha"])
def test_unsupported_peft_types(capsys, tmp_path, tiny_model_dir, kind):
    from peft import LoHaConfig, LoraConfig

    config = (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True) if kind == "dora"
              else LoHaConfig(r=4, target_modules=["q_proj"]))
    make_adapter(tiny_model_dir, tmp_path / "ad", "none", spec=LoraSpec(lorax_json=False, peft_config=config))
    refuse(capsys, tmp_path, str(tmp_path / "ad"), "--trained-on", "none",
           match="DoRA" if kind == "dora" else "is a LoHa adapter")


def test_changed_base_is_refused_unless_told(capsys, tmp_path, tiny_model_dir):
    make_adapter(tiny_model_dir, tmp_path / "ad", "none", spec=LoraSpec(target_modules=["q_proj"]))
    meta = json.loads((tmp_path / "ad" / "lorax.json").read_text())
    meta["base"]["files"]["model.safetensors"] = "0" * 64
    (tmp_path / "ad" / "lorax.json").write_text(json.dumps(meta))
    refuse(capsys, tmp_path, str(tmp_path / "ad"), match="differs from the one the adapter was trained on")
    assert main(["merge", str(tmp_path / "ad"), "--no-verify-base", "--out", str(tmp_path / "ok")]) == 0


def test_quantized_base_for_an_unquantized_adapter(capsys, tmp_path, lorax_adapter):
    refuse(capsys, tmp_path, str(lorax_adapter), "--merge-base", "quantized", match="unquantized base")


def test_trained_on_contradicting_lorax_json(capsys, tmp_path, lorax_adapter):
    refuse(capsys, tmp_path, str(lorax_adapter), "--trained-on", "nf4", match="contradicts")
