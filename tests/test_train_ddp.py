"""`lorax train` under torchrun: 2 CPU processes (gloo) train in lockstep and write one adapter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tiny_data import chat_records, write_jsonl

from train.run import RUN_STATE  # noqa: F401 - the module must import without torch.distributed set up


def test_two_ranks_train_and_rank0_writes_one_adapter(tiny_model_dir, tmp_path):
    data_file = write_jsonl(chat_records(48), tmp_path / "chat.jsonl")
    out = tmp_path / "adapter"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "exporter.cli", "train",
         "--base", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--max-steps", "6",
         "--batch-size", "2", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--max-seq-len", "96",
         "--save-steps", "3", "--logging-steps", "3"],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = dict(re.findall(r"rank (\d)/2 done: 6 steps, lora sha256 ([0-9a-f]{64})", proc.stderr))
    assert set(done) == {"0", "1"}, proc.stderr[-3000:]  # both ranks ran all 6 steps
    assert done["0"] == done["1"]  # DDP kept their LoRA weights identical
    rec = json.loads((out / "lorax.json").read_text())
    assert rec["training"]["world_size"] == 2
    assert rec["training"]["lora_sha256"] == done["0"]
    # the weights moved from their initial values (the digest of an untrained adapter differs)
    assert rec["metrics"]["eval_loss"] < rec["metrics"]["eval_loss_before"]
    # exactly one adapter, no temp dirs from a second writer, checkpoints removed after success
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "chat.jsonl"]
    assert (out / "adapter_model.safetensors").exists()
