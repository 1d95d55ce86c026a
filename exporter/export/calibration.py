"""Calibration text for the importance matrix: the fine-tune's own training rows, rendered as training did.

    lorax export adapter/ --out dist --gguf --quant q4_k_m                     # lorax.json's data.path
    lorax export adapter/ --out dist --gguf --quant q4_k_m --calibration more.jsonl --imatrix-tokens 60000

The rows come from lorax.json's `data.path` (the file `lorax train` read), minus the rows training held out
for eval (the same `split_eval(fraction, seed)` split, so the gate's held-out data never calibrates the
quantizer), each encoded by `train.data.encode` with the recorded `max_seq_len`: chat template, BOS/EOS,
truncation exactly as the model saw them. `--calibration FILE` takes any JSONL in the training forms (or a
datasets dir); without either (an HF model dir, or data that moved), there is no matrix and the export says so.
ONNX int4's GPTQ calibrates on the same rows; their token ids ship as dist/calibration.json (CALIBRATION_FILE)
so the floor and a later `lorax check` quantize from exactly those rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import LoraxError

log = logging.getLogger(__name__)

# ONNX int4's GPTQ rows as token ids, shipped beside the artifacts and named in lorax.json's onnx_recipes
CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    sequences: list[list[int]]
    source: str  # the file the rows came from (written into the imatrix file's `imatrix.datasets`)
    rows: int


def _lorax_data(adapter_dir: Path) -> dict:
    path = adapter_dir / "lorax.json"
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text())
    return {**(meta.get("data") or {}), "seed": meta.get("seed", 0)}


def calibration_source(source: Path, calibration: str | Path | None) -> Path | None:
    """The file to calibrate on: --calibration, else the adapter's recorded training data if it still exists."""
    if calibration:
        return Path(calibration)
    data = _lorax_data(source)
    p = data.get("path")
    return Path(p) if p and Path(p).exists() and Path(p).stat().st_size > 0 else None


def calibration_sequences(source: Path, tokenizer, calibration: str | Path | None = None,
                          max_len: int | None = None) -> Calibration:
    """Token ids of every calibration row, rendered as `lorax train` renders them."""
    from train import data as tdata
    from train.errors import TrainError

    path = calibration_source(source, calibration)
    if path is None:
        raise LoraxError(f"{source}: no calibration data for the importance matrix (lorax.json has no data.path, "
                         "or the file moved); pass --calibration FILE, or --imatrix off")
    recorded = _lorax_data(source)
    try:
        records = tdata.load(path)
        if calibration is None and recorded.get("eval_fraction") and not recorded.get("eval_path"):
            records, _ = tdata.split_eval(records, float(recorded["eval_fraction"]), int(recorded["seed"]))
        max_len = max_len or int(recorded.get("max_seq_len") or 1024)
        seqs = [tdata.encode(r, records.format, tokenizer, max_len)["input_ids"] for r in records.rows]
    except TrainError as e:
        raise LoraxError(f"calibration data: {e}") from None
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise LoraxError(f"{path}: no calibration row renders to 2 or more tokens")
    return Calibration(seqs, str(path), len(seqs))


def calibration_rows(source: Path, merged: Path, opts) -> tuple[tuple[int, ...], ...]:
    """The calibration rows' token ids within the export's token budget; () when the source has none."""
    from transformers import AutoTokenizer

    from formats.gguf.imatrix import budget_rows, token_budget

    try:
        cal = calibration_sequences(source, AutoTokenizer.from_pretrained(merged), opts.calibration)
    except LoraxError as e:
        log.warning("%s; int4 falls back to the weighted search (no GPTQ)", e)
        return ()
    return tuple(tuple(r) for r in budget_rows(cal.sequences, token_budget(merged, opts.imatrix_tokens)))


def write_calibration(rows: tuple[tuple[int, ...], ...], path: Path) -> None:
    path.write_text(json.dumps({"kind": "calibration", "format": "token ids", "rows": [list(r) for r in rows]})
                    + "\n")


def read_calibration(path: Path) -> tuple[tuple[int, ...], ...]:
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoraxError(f"{path}: not a lorax calibration file ({e}); re-run lorax export") from None
    return tuple(tuple(int(t) for t in r) for r in rows)
