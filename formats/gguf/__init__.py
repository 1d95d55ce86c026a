"""GGUF: import (GGUF -> HF dir), export (HF dir -> GGUF), quantize, and a llama.cpp runner."""
