"""`lorax train` on the tiny model: loss falls, the adapter reloads exactly, resume is exact, lorax.json is true."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import chat_records, prompt_completion_records, write_jsonl

from exporter.cli.main import main
from exporter.gate.metrics import compare, max_abs_logit
from lorax_common.hashing import weights_digest
from train.config import TrainConfig
from train.errors import TrainError
from train.run import train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls: 2 threads on a shared 2-core box measured 10-100x slower per step than 1
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(chat_records(64), tmp_path_factory.mktemp("data") / "chat.jsonl")


def cfg_for(base: Path, data_file: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(base=str(base), data=str(data_file), out=str(out), max_seq_len=96, rank=8, alpha=16,
                    lr=5e-3, batch_size=4, logging_steps=5, save_steps=10)
    settings.update(kw)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, chat_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    return train(cfg_for(tiny_model_dir, chat_file, out, max_steps=30))


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def reload_reference(adapter: Path):
    """Base loaded as lorax.json says training loaded it, adapter on top (what merge/gate rebuild)."""
    from peft import PeftModel

    from lorax_common import base_as_trained, record

    rec = record.read(adapter)
    base = base_as_trained.load(rec.base["path"], rec.quantization, rec.base["storage_dtype"])
    return PeftModel.from_pretrained(base, adapter).eval()


def eval_ids(adapter: Path, tok) -> list[list[int]]:
    rows = [json.loads(line) for line in (adapter / "eval.jsonl").read_text().splitlines()]
    return [list(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]


def logits(model, ids: list[list[int]]) -> list[np.ndarray]:
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s])).logits[0].float().numpy() for s in ids]


def test_eval_loss_falls(trained):
    m = trained.record["metrics"]
    assert m["eval_loss"] < 0.5 * m["eval_loss_before"], m
    assert m["train_loss"] < m["train_loss_mean"]  # the last logged window is below the run's mean


def test_adapter_reloads_with_identical_logits(trained):
    ids = eval_ids(trained.out, trained.tokenizer)
    mem = logits(trained.model.eval(), ids)
    ref = reload_reference(trained.out)
    disk = logits(ref, ids)
    assert max(max_abs_logit(a, b) for a, b in zip(mem, disk, strict=True)) <= 1e-5
    # the trained adapter really moved the model away from the base (else the test above proves little)
    with ref.disable_adapter():
        plain = logits(ref, ids)
    assert compare(disk, plain, ids).kld_mean > 0.05
    # and the comparison notices a small corruption of one adapter tensor
    name = next(n for n, _ in ref.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        ref.get_parameter(name).add_(0.05)
    broken = logits(ref, ids)
    assert max(max_abs_logit(a, b) for a, b in zip(mem, broken, strict=True)) > 1e-3


def test_lorax_json_records_what_was_loaded(trained, tiny_model_dir, chat_file):
    rec = json.loads((trained.out / "lorax.json").read_text())
    assert rec == json.loads(json.dumps(trained.record))
    files = {"model.safetensors": hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()}
    assert rec["base"]["files"] == files and rec["base"]["weights_sha256"] == weights_digest(files)
    assert rec["base"]["path"] == str(tiny_model_dir.resolve())
    assert (rec["base"]["storage_dtype"], rec["base"]["architecture"]) == ("float32", "llama")
    assert rec["quantization"] == {"method": "bnb-4bit", "quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                   "compute_dtype": "float32", "quant_storage": "uint8", "unquantized_dtype": "float32",
                                   "load_dtype": "float32", "torch_threads": torch.get_num_threads()}
    assert rec["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "use_rslora": False, "modules_to_save": None,
                           "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    assert rec["data"]["sha256"] == hashlib.sha256(chat_file.read_bytes()).hexdigest()
    assert (rec["data"]["format"], rec["data"]["eval_file"], rec["data"]["truncated"]) == ("messages", "eval.jsonl", 0)
    held = [json.loads(line) for line in (trained.out / "eval.jsonl").read_text().splitlines()]
    assert len(held) == rec["data"]["eval_examples"] == 6 and all(r in chat_records(64) for r in held)
    assert rec["training"]["steps_done"] == 30 and rec["seed"] == 0
    assert rec["training"]["lora_sha256"] == hashlib.sha256(b"".join(
        n.encode() + p.detach().float().numpy().tobytes()
        for n, p in sorted(trained.model.named_parameters()) if p.requires_grad)).hexdigest()
    assert all(rec["versions"][k] for k in ("torch", "transformers", "peft", "bitsandbytes"))
    # the adapter dir is a complete PEFT dir, and the checkpoints were cleaned up
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "eval.jsonl"} <= \
        {p.name for p in trained.out.iterdir()}
    assert not Path(f"{trained.out}.checkpoints").exists()


def test_train_output_goes_through_merge_and_check_as_written(trained, tmp_path):
    """The lorax.json contract end to end: what `lorax train` wrote (no fixture in between) is merged to the
    model that trained, and the gate passes it."""
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    assert main(["merge", str(trained.out), "--out", str(merged)]) == 0
    rec = json.loads((trained.out / "lorax.json").read_text())
    assert rec["schema_version"] == 1
    made = json.loads((merged / "lorax.json").read_text())
    assert made["base"]["weights_sha256"] == rec["base"]["weights_sha256"]
    assert made["trained_on"]["quant_type"] == "nf4" and made["trained_on"]["double_quant"] is True
    ids = eval_ids(trained.out, trained.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    parity = compare(logits(trained.model.eval(), ids), logits(model, ids), ids)
    assert parity.max_abs_logit <= 1e-4 and parity.top1 == 1.0, parity  # tests/test_merge.py's EXACT
    assert main(["check", str(trained.out), str(merged), "--report", str(tmp_path / "gate")]) == 0
    report = json.loads((tmp_path / "gate" / "report.json").read_text())
    assert report["passed"] and report["targets"] and all(t["passed"] for t in report["targets"]), report


class StopAt:
    """A callback that "kills" the run after step `k` (raises, as a crash would)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __getattr__(self, name):  # every other TrainerCallback hook: do nothing
        return lambda *a, **kw: None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.k:
            raise KeyboardInterrupt(f"killed at step {self.k}")


def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, chat_file, tmp_path):
    steps = dict(max_steps=12, save_steps=4, eval_fraction=0.0)
    full = train(cfg_for(tiny_model_dir, chat_file, tmp_path / "full", **steps))
    killed = cfg_for(tiny_model_dir, chat_file, tmp_path / "killed", **steps)
    with pytest.raises(KeyboardInterrupt):
        train(killed, callbacks=[StopAt(6)])
    ckpt = tmp_path / "killed.checkpoints"
    assert not (tmp_path / "killed").exists()  # no half adapter
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-4"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed")] == []  # no temp left behind

    # a second plain run would silently restart: it must be a choice
    with pytest.raises(TrainError, match="pass --resume to continue it or --force to start over"):
        train(killed)
    with pytest.raises(TrainError, match=r"--resume with a different config \(lr\)"):
        train(cfg_for(tiny_model_dir, chat_file, tmp_path / "killed", lr=1e-3, **steps), resume=True)
    resumed = train(killed, resume=True)
    assert resumed.record["training"]["resumed_from"] == "checkpoint-4"
    # it continued rather than restarted: this session saw only steps 5-12 (2/3 of the batches' tokens)
    assert 0 < resumed.record["metrics"]["train_tokens"] < 0.9 * full.record["metrics"]["train_tokens"]
    assert resumed.record["training"]["tokens_seen"] == full.record["training"]["tokens_seen"]
    a, b = adapter_tensors(full.out), adapter_tensors(resumed.out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    # the comparison can fail: another seed gives another adapter
    other = train(cfg_for(tiny_model_dir, chat_file, tmp_path / "seed1", seed=1, **steps))
    c = adapter_tensors(other.out)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3


def test_refusals_happen_before_training(tiny_model_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    args = ["train", "--base", str(tiny_model_dir), "--data", str(chat_file), "--out", str(out)]
    assert main(args) == 2
    assert "already exists; choose another --out or pass --force" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "user file"
    assert main([*args[:-1], str(tmp_path / "new"), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    bad = write_jsonl(['{"text": "a"}', "{oops"], tmp_path / "bad.jsonl")
    assert main(["train", "--base", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fp4_rslora_named_targets_prompt_completion(tiny_model_dir, tmp_path):
    data_file = write_jsonl(prompt_completion_records(16), tmp_path / "pc.jsonl")
    res = train(cfg_for(tiny_model_dir, data_file, tmp_path / "a", quant="fp4", double_quant=False, use_rslora=True,
                        target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], max_steps=2,
                        eval_fraction=0.0))
    rec = res.record
    assert (rec["quantization"]["quant_type"], rec["quantization"]["double_quant"]) == ("fp4", False)
    assert rec["lora"]["target_modules"] == ["q_proj", "v_proj"] and rec["lora"]["use_rslora"] is True
    assert rec["lora"]["modules_to_save"] == ["lm_head"]
    saved = adapter_tensors(tmp_path / "a")
    assert any("lm_head" in k for k in saved) and any("q_proj.lora_A" in k for k in saved)
    assert not any("k_proj" in k for k in saved)
    assert rec["data"]["format"] == "prompt_completion" and rec["data"]["eval_file"] is None
    q = res.model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # rsLoRA: alpha/sqrt(r), not alpha/r
    assert q.weight.quant_state.quant_type == "fp4" and q.weight.quant_state.nested is False
    assert not (tmp_path / "a" / "eval.jsonl").exists()


def test_no_quant_trains_plain_lora(tiny_model_dir, chat_file, tmp_path):
    import bitsandbytes as bnb

    res = train(cfg_for(tiny_model_dir, chat_file, tmp_path / "a", quant="none", max_steps=2, eval_fraction=0.0))
    assert res.record["quantization"] == {"method": "none", "compute_dtype": "float32", "load_dtype": "float32"}
    assert res.record["base"]["storage_dtype"] == "float32"
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in res.model.modules())


def test_bad_target_modules_is_a_clear_error(tiny_model_dir, chat_file, tmp_path):
    with pytest.raises(TrainError, match="target_modules .*do not fit this model"):
        train(cfg_for(tiny_model_dir, chat_file, tmp_path / "a", target_modules=["qkv_proj"], max_steps=1))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("load_dtype", "expect"), [("auto", "float32"), ("bfloat16", "bfloat16")])
def test_load_dtype_of_a_bf16_base_is_recorded_as_quantized(tiny_model_factory, chat_file, tmp_path, load_dtype, expect):
    # auto loads in the compute dtype (float32 on CPU) whatever the files hold; lorax.json must say which
    # dtype bitsandbytes quantized from, because the merge re-quantizes from that dtype
    base = tiny_model_factory(dtype="bfloat16")
    res = train(cfg_for(base, chat_file, tmp_path / "a", load_dtype=load_dtype, max_steps=1, eval_fraction=0.0))
    q = res.model.base_model.model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert str(q.dtype) == f"torch.{expect}"
    assert res.record["quantization"]["load_dtype"] == res.record["base"]["storage_dtype"] == expect
