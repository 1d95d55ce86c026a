#!/usr/bin/env bash
# One prepared GPU check, for sessions lent a CUDA machine (CI never has one):
#   bash scripts/gpu_check.sh [OUT_DIR]
# Installs what it needs (CUDA torch from PyPI, llama-cpp-python from source, onnxruntime-gpu), trains
# ~30 QLoRA steps on CUDA with bf16 compute on SmolLM2, exports GGUF (q8_0, q4_k_m) and ONNX, runs the
# parity gate, and prints tokens/s for training and each runtime. Paste its last table into
# docs/BENCHMARKS.md, marked with the GPU model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out/gpu}}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m venv .venv-gpu
PY=.venv-gpu/bin/python
$PY -m pip install -q --upgrade pip
$PY -m pip install -q torch            # the CUDA build on a GPU machine
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) $PY -m pip install -q -e '.[dev]'
$PY -m pip uninstall -y -q onnxruntime && $PY -m pip install -q onnxruntime-gpu
$PY scripts/fetch_smollm2.py --import
$PY - <<'PY' | tee "$OUT/versions.txt"
from lorax_common.versions import version_report; print(version_report())
PY
$PY scripts/make_demo_data.py --out "$OUT/data"
BASE=$(PYTHONPATH=scripts $PY -c "from default_model import hf_dir; print(hf_dir())")
START=$(date +%s.%N)
.venv-gpu/bin/lorax train --base "$BASE" --data "$OUT/data/train.jsonl" --eval-data "$OUT/data/eval.jsonl" \
  --out "$OUT/adapter" --max-steps 30 --batch-size 8 --lr 1e-3 --max-seq-len 160 --compute-dtype bfloat16 --force
END=$(date +%s.%N)
TOKENS=$($PY -c "import json; d=json.load(open('$OUT/adapter/lorax.json')); print(d.get('metrics',{}).get('train_tokens', 0))")
echo "train: 30 steps in $(echo "$END - $START" | bc) s, $TOKENS tokens" | tee "$OUT/train.txt"
.venv-gpu/bin/lorax export "$OUT/adapter" --out "$OUT/dist" --gguf --quant q8_0 --quant q4_k_m --onnx --force \
  | tee "$OUT/export.txt"
$PY scripts/demo.py --out "$OUT/demo" --steps 30 | tail -20 | tee "$OUT/demo.txt"
