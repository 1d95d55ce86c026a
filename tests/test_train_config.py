"""`lorax train` config: defaults < YAML < flags, unknown keys and bad values rejected by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from exporter.cli.main import main
from train.command import command
from train.config import TrainConfig, resolve
from train.errors import TrainError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def print_config(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["train", *args, "--print-config"])
    out, err = capsys.readouterr()
    return code, (yaml.safe_load(out) if code == 0 else None), err


def test_precedence_defaults_yaml_flags(tmp_path):
    cfg_file = write(tmp_path / "train.yaml", "lr: 0.001\nrank: 8\ndata: data/train.jsonl\nbase: /abs/base\n")
    cfg = resolve(cfg_file, {"lr": 5e-4, "rank": None})
    assert cfg.lr == 5e-4  # flag beats YAML
    assert cfg.rank == 8  # YAML beats default; a flag left unset (None) does not erase it
    assert cfg.alpha == TrainConfig().alpha  # default survives
    assert cfg.data == str(tmp_path / "data/train.jsonl")  # relative to the YAML file's folder
    assert cfg.base == "/abs/base"


def test_every_config_key_is_a_flag():
    params = {p.name for p in command.params}
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in params]
    assert missing == []


def test_print_config_shows_resolved_values(tmp_path, capsys):
    cfg_file = write(tmp_path / "t.yaml", "rank: 4\nalpha: 8\nmax_steps: 10\n")
    code, shown, err = print_config(
        capsys, "--config", str(cfg_file), "--max-steps", "50", "--lr", "1e-4", "--no-quant",
        "--no-double-quant", "--target-modules", "q_proj,v_proj", "--seed", "7",
    )
    assert code == 0, err
    assert shown["rank"] == 4 and shown["alpha"] == 8
    assert shown["max_steps"] == 50 and shown["lr"] == 1e-4 and shown["seed"] == 7
    assert shown["quant"] == "none" and shown["double_quant"] is False
    assert shown["target_modules"] == ["q_proj", "v_proj"]
    assert set(shown) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    cfg_file = write(tmp_path / "t.yaml", "rank: 4\nlearning_rat: 0.1\n")
    with pytest.raises(TrainError, match=r"unknown config key 'learning_rat'"):
        resolve(cfg_file)
    code, _, err = print_config(capsys, "--config", str(cfg_file))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "'learning_rat'" in err


@pytest.mark.parametrize(("text", "key"), [
    ("rank: sixteen\n", "'rank' must be an integer"),
    ("lr: fast\n", "'lr' must be a number"),
    ("double_quant: maybe\n", "'double_quant' must be true or false"),
    ("quant: nf5\n", "'quant' must be one of nf4, fp4, none"),
    ("target_modules: []\n", "'target_modules' must be a list of names"),
    ("max_steps: true\n", "'max_steps' must be an integer"),
])
def test_bad_values_are_named(tmp_path, text, key):
    with pytest.raises(TrainError, match=key):
        resolve(write(tmp_path / "t.yaml", text))


def test_valid_values_pass_the_same_checks(tmp_path):
    # the checks above must not reject good input of the same keys
    cfg = resolve(write(tmp_path / "t.yaml", "rank: 16\nlr: 1\ndouble_quant: false\nquant: fp4\n"
                                              "target_modules: [q_proj]\nmax_steps: 3\n"))
    assert (cfg.rank, cfg.lr, cfg.double_quant, cfg.quant, cfg.target_modules, cfg.max_steps) == \
        (16, 1.0, False, "fp4", ["q_proj"], 3)


def test_bad_flag_value_exits_2(capsys):
    code, _, err = print_config(capsys, "--quant", "int3")
    assert code == 2 and "int3" in err


def test_no_quant_contradiction(capsys):
    code, _, err = print_config(capsys, "--no-quant", "--quant", "fp4")
    assert code == 2 and "--no-quant contradicts --quant fp4" in err


def test_broken_yaml_names_file_and_line(tmp_path):
    cfg_file = write(tmp_path / "t.yaml", "rank: 4\nlr: [1, 2\nseed: 0\n")
    with pytest.raises(TrainError, match=rf"{cfg_file}:\d+: not valid YAML"):
        resolve(cfg_file)


def test_missing_required_keys_before_any_work(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "missing --base, --out" in err
