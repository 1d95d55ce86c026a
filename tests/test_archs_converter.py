"""lorax's GGUF vs llama.cpp's own convert_hf_to_gguf.py on the same tiny models of the issue-15 archs (slow).

    pytest -m slow tests/test_archs_converter.py

The converter comes from the llama-cpp-python sdist on PyPI (scripts/bench_gguf.py's find_peer), the exact
llama.cpp lorax links. The tiny models carry SmolLM2's tokenizer, a vocabulary the converter knows. Asserted:
every metadata key of the converter's file that llama.cpp reads (`<arch>.*`, tokenizer.ggml.*) is in ours
with the same value, and ours is no further from HF in llama.cpp than the converter's file (or within the
f32 limit).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader
from gguf_helpers import parity
from tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama3.2", "smollm3", "phi3", "gemma3")
KLD_F32 = 1e-4
# keys the converter writes that are about the file, not the model
IGNORED = ("general.", "GGUF.")


@pytest.fixture(scope="module")
def peer() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_gguf import find_peer

    found = find_peer(None)
    if found is None:
        pytest.fail("llama.cpp's convert_hf_to_gguf.py not found (needs the llama-cpp-python sdist from PyPI)")
    return found


def read_meta(path: Path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith(IGNORED)}


def converter_gguf(peer: Path, model: Path, out: Path) -> Path:
    src = out.parent / "peer-input"
    shutil.copytree(model, src)
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"  # the converter's Phi-3 path wants a GPT-2 class for a BPE vocab
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(peer / "convert_hf_to_gguf.py"), str(src), "--outtype", "f32", "--outfile", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_metadata_and_parity_against_llama_cpp_converter(peer, smollm2_dir, tmp_path, name):
    from transformers import AutoTokenizer

    from formats.gguf.writer import write_gguf

    model = build_tiny_model(tmp_path / "tiny", arch=name, tokenizer=AutoTokenizer.from_pretrained(smollm2_dir))
    ours = write_gguf(model, tmp_path / "ours.gguf", "f32", progress=False)
    theirs = converter_gguf(peer, model, tmp_path / "theirs.gguf")
    mine, ref = read_meta(ours), read_meta(theirs)
    missing = sorted(set(ref) - set(mine))
    differ = {k: (mine[k], ref[k]) for k in set(ref) & set(mine)
              if (mine[k] != pytest.approx(ref[k], rel=1e-6) if isinstance(ref[k], float) else mine[k] != ref[k])}
    print(f"\n{name}: keys only in ours {sorted(set(mine) - set(ref))}; only in the converter's {missing}")
    assert missing == [] and differ == {}, (missing, {k: str(v)[:120] for k, v in differ.items()})
    p_ours, p_theirs = parity(model, ours), parity(model, theirs)
    print(f"{name}: ours kld {p_ours.kld_mean:.3g} top1 {p_ours.top1:.4f}; "
          f"converter kld {p_theirs.kld_mean:.3g} top1 {p_theirs.top1:.4f}")
    assert p_ours.kld_mean <= max(p_theirs.kld_mean, KLD_F32) and p_ours.top1 >= min(p_theirs.top1, 0.99)
