"""The training run: data -> base (4-bit) + LoRA -> transformers Trainer -> adapter dir + lorax.json.

    lorax train --config train.yaml [--resume] [--force]
    torchrun --nproc_per_node 2 -m exporter.cli.main train --config train.yaml     # DDP, same command

Checkpoints go to `<out>.checkpoints/` (beside the output, never inside it); the adapter dir is
built in a temp dir and renamed into place only after the final eval, so an interrupted run leaves
checkpoints to `--resume` from, never a half adapter. Under DDP every rank trains; only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorax_common import outputs, record
from lorax_common.hashing import hash_tree
from lorax_common.record import AdapterRecord
from train import data, lorax_json
from train.config import TrainConfig, check_trainer_names, checkpoint_dir, require, to_dict
from train.errors import TrainError
from train.model import (
    compute_dtype,
    load_base,
    load_tokenizer,
    lora_record,
    quant_record,
    resolve_base,
    unquantized_dtype,
    wrap_lora,
)

RUN_STATE = "lorax-run.json"  # in the checkpoint dir: the config of the run, checked by --resume

# config keys that may change between an interrupted run and its --resume (they do not touch the numbers)
RESUME_MAY_CHANGE = frozenset({"out", "checkpoint_dir", "keep_checkpoints", "logging_steps", "save_total_limit"})


@dataclass
class TrainResult:
    out: Path
    model: Any  # the trained PeftModel, still in memory
    tokenizer: Any
    record: dict[str, Any]  # what lorax.json holds


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _quiet() -> bool:
    from lorax_common import log

    return log.current() == log.QUIET


def say(msg: str, all_ranks: bool = False, result: bool = False) -> None:
    """A progress line on stderr (rank 0 unless all_ranks); under `lorax -q` only results are said."""
    if _quiet() and not result:
        return
    if all_ranks or rank() == 0:
        print(f"lorax train: {msg}", file=sys.stderr, flush=True)


def lora_digest(model) -> str:
    """sha256 over the trainable tensors: equal on every DDP rank if they trained in lockstep."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in new if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))


def check_paths(cfg: TrainConfig, resume: bool, force: bool) -> tuple[Path, Path, str | None]:
    """Refuse before any work: an existing output, or stray checkpoints, must be a deliberate choice."""
    from transformers.trainer_utils import get_last_checkpoint

    out, ckpt = Path(cfg.out), checkpoint_dir(cfg)
    # --force replaces the output, never an input (data next to a base would go with it)
    outputs.refuse_overlap(out, [cfg.base if Path(cfg.base).exists() else None, cfg.data, cfg.eval_data, ckpt])
    if out.exists() and not force:
        raise TrainError(f"{out} already exists; choose another --out or pass --force to replace it")
    last = get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None
    if resume:
        if last is None:
            raise TrainError(f"--resume: no checkpoint in {ckpt}; run without --resume to start fresh")
        state = ckpt / RUN_STATE
        if state.exists():
            changed = config_changes(json.loads(state.read_text())["config"], to_dict(cfg))
            if changed:
                raise TrainError(f"--resume with a different config ({', '.join(changed)}); "
                                 "resume with the original settings or start over with --force")
    elif last is not None:
        if not force:
            raise TrainError(f"{ckpt} holds checkpoints of an earlier run; pass --resume to continue it "
                             "or --force to start over")
        if rank() == 0:
            shutil.rmtree(ckpt)
    return out, ckpt, last if resume else None


def training_args(cfg: TrainConfig, ckpt: Path, has_eval: bool, resuming: bool):
    from transformers import TrainingArguments

    compute = compute_dtype(cfg)
    cuda = torch.cuda.is_available()
    periodic_eval = has_eval and cfg.eval_steps > 0
    return TrainingArguments(
        output_dir=str(ckpt),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=cfg.eval_steps if periodic_eval else None,
        # The eval loss before training, taken inside train(): a Trainer.evaluate() *before* train() marks the
        # model as prepared, and accelerate then skips the DDP wrap (measured: ranks trained apart, silently).
        eval_on_start=has_eval and not resuming,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # autocast only where it pays: the 4-bit/LoRA compute dtype already decides the matmul dtype
        bf16=cuda and compute == "bfloat16",
        fp16=cuda and compute == "float16",
        use_cpu=not cuda,
        ddp_backend=None if cuda or world_size() == 1 else "gloo",
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=cuda,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=_quiet(),  # the Trainer's own bar follows `lorax -q`
    )


def make_throughput_callback():
    """Tokens and seconds of this session's training steps: a resumed run starts mid-way, and the
    evaluations inside train() (eval_on_start, eval_steps) are not training time."""
    import time

    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        tokens0, t0, eval_s, tokens, seconds = 0, 0.0, 0.0, 0, 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.tokens0, self.t0, self.eval_s = state.num_input_tokens_seen, time.perf_counter(), 0.0

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.eval_s += (metrics or {}).get("eval_runtime", 0.0)

        def on_train_end(self, args, state, control, **kw):
            self.tokens = state.num_input_tokens_seen - self.tokens0
            self.seconds = time.perf_counter() - self.t0 - self.eval_s

    return Throughput()


def first_eval_loss(log_history: list[dict]) -> float | None:
    """The step-0 eval loss (eval_on_start); a resumed run reloads it with the checkpoint's history."""
    return next((float(e["eval_loss"]) for e in log_history if "eval_loss" in e and e.get("step") == 0), None)


def last_logged_loss(log_history: list[dict], fallback: float) -> float:
    losses = [e["loss"] for e in log_history if "loss" in e]
    return float(losses[-1]) if losses else float(fallback)


@dataclass
class Prepared:
    """Everything loaded before the Trainer exists: data, tokenizer, the wrapped model, what was loaded."""

    base: Path
    tok: Any
    model: Any
    train_recs: data.Records
    eval_recs: data.Records | None
    train_enc: data.Encoded
    eval_enc: data.Encoded | None
    quant: dict[str, Any]
    storage_dtype: str


def prepare(cfg: TrainConfig) -> Prepared:
    # data first: a malformed line should fail in a second, not after loading the model
    records = data.load(cfg.data)
    if cfg.eval_data:
        train_recs, eval_recs = records, data.load(cfg.eval_data)
    else:
        train_recs, eval_recs = data.split_eval(records, cfg.eval_fraction, cfg.seed)
    base = resolve_base(cfg.base)
    tok = load_tokenizer(base)
    train_enc = data.tokenize(train_recs, tok, cfg.max_seq_len, "tokenize train")
    eval_enc = data.tokenize(eval_recs, tok, cfg.max_seq_len, "tokenize eval") if eval_recs else None
    say(f"data: {len(train_enc.dataset)} train / {len(eval_enc.dataset) if eval_enc else 0} eval examples "
        f"({train_recs.format}), {train_enc.tokens} train tokens; {train_enc.truncated} truncated at "
        f"max_seq_len={cfg.max_seq_len} ({train_enc.dropped} dropped: no completion token left)")

    from transformers import set_seed

    model = load_base(cfg, base)
    quant, storage = quant_record(cfg, model, base)
    set_seed(cfg.seed)  # LoRA A matrices are drawn here: the seed decides them
    model = wrap_lora(cfg, model)
    if cfg.quant != "none":
        quant["unquantized_dtype"] = unquantized_dtype(model)
    return Prepared(base, tok, model, train_recs, eval_recs, train_enc, eval_enc, quant, storage)


def train(cfg: TrainConfig, resume: bool = False, force: bool = False, callbacks: Sequence[Any] = ()) -> TrainResult:
    require(cfg)
    check_trainer_names(cfg)
    out, ckpt, last = check_paths(cfg, resume, force)
    # rank 0 owns the output for the whole run: a second run on the same --out fails at once
    with outputs.output_lock(out) if rank() == 0 else contextlib.nullcontext() as lock:
        return _train(cfg, out, ckpt, last, force, callbacks, lock)


def _train(cfg: TrainConfig, out: Path, ckpt: Path, last: str | None, force: bool, callbacks: Sequence[Any],
           lock: outputs.OutputLock | None) -> TrainResult:
    from transformers import DataCollatorForSeq2Seq, Trainer

    p = prepare(cfg)

    throughput = make_throughput_callback()
    trainer = Trainer(
        model=p.model,
        args=training_args(cfg, ckpt, p.eval_enc is not None, resuming=last is not None),
        train_dataset=p.train_enc.dataset,
        eval_dataset=p.eval_enc.dataset if p.eval_enc else None,
        # pads input_ids with the pad id and labels with -100
        data_collator=DataCollatorForSeq2Seq(p.tok, padding=True, label_pad_token_id=data.IGNORE),
        processing_class=p.tok,
        callbacks=[throughput, *callbacks],
    )
    if last:
        say(f"resuming from {last}")
    elif trainer.is_world_process_zero():
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / RUN_STATE).write_text(json.dumps({"config": to_dict(cfg)}, indent=2))

    result = trainer.train(resume_from_checkpoint=last)
    metrics = {
        "train_loss": last_logged_loss(trainer.state.log_history, result.training_loss),
        "train_loss_mean": result.training_loss,
        "eval_loss": trainer.evaluate()["eval_loss"] if p.eval_enc else None,
        "eval_loss_before": first_eval_loss(trainer.state.log_history),
        "trainer_runtime_s": result.metrics["train_runtime"],  # Trainer's own figure (includes in-train eval)
        "train_runtime_s": throughput.seconds,
        "train_tokens": throughput.tokens,
        "train_tokens_per_second": throughput.tokens / throughput.seconds if throughput.seconds else None,
    }
    model = trainer.model
    digest = lora_digest(model)
    say(f"rank {rank()}/{world_size()} done: {trainer.state.global_step} steps, lora sha256 {digest}", all_ranks=True)

    recorded: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        training = {"steps_done": trainer.state.global_step, "tokens_seen": trainer.state.num_input_tokens_seen,
                    "resumed_from": Path(last).name if last else None, "lora_sha256": digest}
        adapter_record = build_record(cfg, p, model, training, metrics)
        write_output(out, force, model, p.tok, p.eval_recs, adapter_record, lock)
        recorded = adapter_record.to_dict()
        if not cfg.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
        say(f"wrote {out} (eval loss {metrics['eval_loss_before']} -> {metrics['eval_loss']})", result=True)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, model, p.tok, recorded)


def build_record(cfg: TrainConfig, p: Prepared, model, run: dict[str, Any], metrics: dict[str, Any]) -> AdapterRecord:
    data_path = Path(cfg.data)
    return lorax_json.build(
        base=lorax_json.base_record(p.base, p.storage_dtype, model.config.model_type,
                                    hub_id=None if Path(cfg.base).exists() else cfg.base),
        quantization=p.quant,
        lora=lora_record(model),
        data={"path": str(data_path.resolve()), "sha256": hash_tree(data_path),
              "format": p.train_recs.format,
              "eval_path": str(Path(cfg.eval_data).resolve()) if cfg.eval_data else None,
              "eval_fraction": 0.0 if cfg.eval_data else cfg.eval_fraction,
              "eval_file": "eval.jsonl" if p.eval_recs else None, "max_seq_len": cfg.max_seq_len,
              "truncated": p.train_enc.truncated, "dropped": p.train_enc.dropped,
              "train_examples": len(p.train_enc.dataset),
              "eval_examples": len(p.eval_enc.dataset) if p.eval_enc else 0},
        seed=cfg.seed,
        training={"max_steps": cfg.max_steps, "epochs": cfg.epochs, "lr": cfg.lr, "lr_scheduler": cfg.lr_scheduler,
                  "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay,
                  "max_grad_norm": cfg.max_grad_norm, "optim": cfg.optim, "batch_size": cfg.batch_size,
                  "grad_accum": cfg.grad_accum, "world_size": world_size(),
                  "gradient_checkpointing": cfg.gradient_checkpointing,
                  "device": "cuda" if torch.cuda.is_available() else "cpu", **run},
        metrics=metrics,
    )


def write_output(out: Path, force: bool, model, tok, eval_recs: data.Records | None, adapter_record: AdapterRecord,
                 lock: outputs.OutputLock | None = None) -> None:
    umask = outputs.umask()
    with outputs.atomic_dir(out, force, lock=lock) as tmp:
        model.save_pretrained(tmp)  # PEFT: adapter_config.json + adapter_model.safetensors
        tok.save_pretrained(tmp)
        from formats.hf.compat import patch_dir

        patch_dir(tmp)  # save_pretrained records how the tokenizer was loaded (is_local, ...): not shipped
        if eval_recs:
            data.write_jsonl(eval_recs, tmp / "eval.jsonl")
        record.write(tmp, adapter_record)
        for f in tmp.iterdir():
            # some writers create 0600 files (temp file + rename); the adapter should read like any output
            os.chmod(f, 0o666 & ~umask)
