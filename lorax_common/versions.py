"""Versions: lorax's own (from package metadata, so pyproject.toml is the one place it is written), the
numeric stack's (recorded in every lorax.json, printed by `lorax --version`), and whether CUDA is usable.

    lorax --version
"""

from __future__ import annotations

import importlib.metadata as md


def _own_version() -> str:
    try:
        return md.version("lorax")
    except md.PackageNotFoundError:  # a source checkout that was never installed
        return "0+unknown"


LORAX_VERSION = _own_version()

# distribution name -> label shown to the user
PACKAGES: dict[str, str] = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "bitsandbytes": "bitsandbytes",
    "llama-cpp-python": "llama-cpp-python",
    "onnxruntime": "onnxruntime",
    "onnxruntime-gpu": "onnxruntime-gpu",
    "gguf": "gguf",
    "onnx": "onnx",
    "accelerate": "accelerate",
    "datasets": "datasets",
}


def package_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (no heavy imports)."""
    out: dict[str, str | None] = {"lorax": LORAX_VERSION}
    for dist, label in PACKAGES.items():
        try:
            out[label] = md.version(dist)
        except md.PackageNotFoundError:
            out[label] = None
    return out


def llama_cpp_build() -> str | None:
    """The llama.cpp build llama-cpp-python was compiled from (its system info string)."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - a broken native lib must not break --version
        return None
    try:
        info = llama_cpp.llama_print_system_info()
        return info.decode() if isinstance(info, bytes) else str(info)
    except Exception:  # noqa: BLE001
        return None


def cuda_status() -> str:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"torch unavailable ({e.__class__.__name__})"
    if torch.cuda.is_available():
        return f"yes ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
    return "no"


def version_report() -> str:
    lines = [f"lorax {LORAX_VERSION}"]
    for label, v in package_versions().items():
        if label == "lorax" or (v is None and label == "onnxruntime-gpu"):
            continue
        lines.append(f"  {label:18s} {v or 'not installed'}")
    lines.append(f"  {'CUDA usable':18s} {cuda_status()}")
    build = llama_cpp_build()
    if build:
        lines.append(f"  {'llama.cpp build':18s} {build.strip()}")
    return "\n".join(lines)
