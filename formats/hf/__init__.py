"""Hugging Face safetensors dirs: the runner the gate measures them with, and files other runtimes can read.

    from formats.hf.runner import HFRunner
"""
