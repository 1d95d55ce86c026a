"""Shared fixtures: tiny random models (fast tests) and the imported SmolLM2 (tests marked slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every gate in a test computes its own reference (a fault planted in one must not be masked by outputs a
# previous test stored); tests/test_reference_store.py switches reuse on, in a temp dir, where it is tested.
os.environ.setdefault("LORAX_REFERENCE_CACHE", "off")

from tiny_models import TinySpec, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (~165K params, float32) with a byte-level BPE tokenizer and chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (and cache per session) tiny models of other shapes: factory(arch=..., tie=..., dtype=...)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", tie_word_embeddings: bool | None = None, dtype: str = "float32", **kw) -> Path:
        key = (arch, tie_word_embeddings, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"{arch}-tie{tie_word_embeddings}-{dtype}-{len(cache)}"
            cache[key] = build_tiny_model(tmp_path_factory.mktemp("tiny") / name, arch=arch, spec=TinySpec(tie_word_embeddings=tie_word_embeddings, dtype=dtype, **kw))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def nf4_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA adapter on the tiny model, trained-on NF4 with double quant (read-only for tests)."""
    from adapters import LoraSpec, make_adapter

    out = tmp_path_factory.mktemp("nf4-adapter") / "adapter"
    make_adapter(tiny_model_dir, out, trained_on="nf4", double_quant=True, spec=LoraSpec(seed=0))
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from default_model import gguf_path

    try:
        return gguf_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF into an HF dir (cached under the lorax cache dir)."""
    from default_model import hf_dir

    return hf_dir()
