# lorax: make install | test | test-slow | demo | bench | lint
# Everything runs in ./.venv. torch comes from `pip install torch==2.13.0` (a CPU wheel on this
# machine kind); the rest is pinned by constraints.txt so numerics do not drift under users.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-gpu test test-slow demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and alone: asking for it through a range could pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH)"
	# llama-cpp-python compiles llama.cpp from source (~13 min on 2 cores, cached by pip afterwards).
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -c constraints.txt -e '.[dev,clients]'
	$(BIN)/python scripts/fetch_smollm2.py
	touch $(STAMP)

# onnxruntime-gpu replaces onnxruntime (the two cannot co-install). --no-deps: onnxruntime-genai (a core
# dependency) requires the CPU onnxruntime and would bring it back; onnxruntime-gpu's own deps are installed.
install-gpu: install
	$(BIN)/pip uninstall -y onnxruntime
	$(BIN)/pip install --no-deps -c constraints.txt 'onnxruntime-gpu>=1.23'

test: install
	$(BIN)/python -m pytest -q

SLOW_TESTS ?= tests
test-slow: install
	$(BIN)/python -m pytest -q -m slow $(SLOW_TESTS)

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python scripts/bench.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
