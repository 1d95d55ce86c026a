"""GPTQ for MatMulNBits: 4-bit blocks whose rounding error the not-yet-rounded columns absorb.

    lorax export adapter/ --out dist/ --onnx --onnx-quant int4     # formats/onnx/quantize.py calls these

    from formats.onnx.gptq import collect_hessians, gptq_rows
    hess = collect_hessians("merged/", sequences)                  # HF weight name -> mean x xᵀ of its input
    blocks = gptq_rows(w, hess["model.layers.0.mlp.up_proj.weight"], bits=4, block=32)

Rounding each weight to its nearest grid point (or the best grid per block, formats/onnx/blockquant.py)
minimises the error of the weights; what the model feels is the error of the layer's *output* on real
inputs, ‖X Wᵀ − X Qᵀ‖², which depends on how the input columns correlate. GPTQ (Frantar et al., 2022)
rounds one input column at a time and spreads its error over the columns still to come through the inverse
of H = XᵀX, so the output error stays small even on a coarse grid. Each block's scale and integer zero
point are chosen by blockquant's weighted search on the block's columns *as updated so far*, when its first
column comes up; codes, scales and zero points are exactly MatMulNBits' (w ≈ (code − zp) · scale).

Measured on the demo's QLoRA merge (fake-quantized in torch, 24 held-out rows, KLD vs the float32 merge):
every decoder linear at 4 bits in blocks of 32 with the lm_head at 8 — search 0.454 (top-1 0.769), GPTQ
0.033 (0.940); search in blocks of 16 with v/down/gate also at 8 bits (the previous int4) 0.119 (0.907).

Pure functions on torch tensors, plus the calibration forward that collects H (torch hooks on nn.Linear).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from formats.onnx.blockquant import Blocks, row_sigma2, search_blocks, weigh

DAMP = 0.01  # added to H's diagonal, as a share of its mean: keeps the inverse finite on rank-poor inputs
COLUMN_BATCH = 128  # columns updated together before the rest of the weight sees their error (GPTQ's lazy batch)
HESSIAN_MEMORY_SHARE = 0.25  # the Hessians of one calibration pass may take this share of free memory


def gptq_rows(w: torch.Tensor | np.ndarray, hessian: torch.Tensor | np.ndarray, bits: int, block: int,
              symmetric: bool = False, damp: float = DAMP) -> Blocks:
    """Quantize w [N, K] (N output rows, blocks along K) given H [K, K] = mean x xᵀ of its input.

    Rows are independent given H, so weights that read the same input (q/k/v, gate/up) can be passed stacked.
    With H diagonal, no error moves between columns and the result equals blockquant.quantize_rows weighted
    by diag(H)."""
    x = torch.as_tensor(np.asarray(w, dtype=np.float32) if not torch.is_tensor(w) else w, dtype=torch.float32)
    x = x.clone()
    n, k = x.shape
    if k % block or COLUMN_BATCH % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    h = torch.as_tensor(np.asarray(hessian, dtype=np.float32) if not torch.is_tensor(hessian) else hessian,
                        dtype=torch.float32).clone()
    dead = torch.diagonal(h) <= 0  # columns no calibration token used: nothing to preserve there
    h[dead, dead] = 1.0
    importance = torch.diagonal(h).clone().reshape(1, k)
    sigma2 = row_sigma2(x)  # the search's row scale, from the weight as given (as quantize_rows weighs)
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(k)
    # the upper Cholesky factor of H⁻¹: row i holds how column i's error spreads over columns i..K-1
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmax = (1 << bits) - 1
    nb = k // block
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, nb)
    zps = torch.empty(n, nb)
    for c0 in range(0, k, COLUMN_BATCH):
        c1 = min(c0 + COLUMN_BATCH, k)
        part, err = x[:, c0:c1].clone(), torch.zeros(n, c1 - c0)
        ui = u[c0:c1, c0:c1]
        for i in range(c1 - c0):
            col = c0 + i
            if col % block == 0:  # the block's grid, from its columns with the error moved so far
                cols = part[:, i:i + block]
                weight = weigh(cols, importance[:, col:col + block].expand_as(cols), sigma2)
                _, s, z = search_blocks(cols, weight, bits, symmetric)
                scales[:, col // block], zps[:, col // block] = s.reshape(-1), z.reshape(-1)
            s, z = scales[:, col // block], zps[:, col // block]
            q = torch.clamp(torch.round(part[:, i] / s + z), 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            e = (part[:, i] - (q - z) * s) / ui[i, i]
            part[:, i:] -= e.unsqueeze(1) * ui[i, i:].unsqueeze(0)
            err[:, i] = e
        x[:, c1:] -= err @ u[c0:c1, c1:]
    return Blocks(codes.reshape(n, nb, block), scales, zps.to(torch.uint8), bits)


def hessian_bytes(in_features: Sequence[int]) -> int:
    return sum(4 * k * k for k in in_features)


def collect_hessians(hf_dir: str | Path, sequences: Sequence[Sequence[int]], names: set[str] | None = None, *,
                     token_budget: int = 32_768, model=None, dtype: str | None = None,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """HF weight name -> mean x xᵀ [K, K] (float32) of the input of every nn.Linear named in `names` (all when
    None), over the first `token_budget` tokens of `sequences` (right-padded batches, pads dropped).

    Linears that read one tensor (q/k/v, gate/up) share one matrix object. The output projection's input is
    the decoder's last hidden state; a tied head is keyed by the embedding's name, the tensor the checkpoint
    holds. When all matrices would pass HESSIAN_MEMORY_SHARE of free memory, the layers are collected in
    several passes over the calibration rows."""
    import psutil

    from formats.gguf.imatrix import budget_rows, compute_dtype
    from lorax_common.log import progress as bar_of

    if model is None:
        from formats.hf.load import load_causal_lm

        model = load_causal_lm(hf_dir, dtype or compute_dtype())
    model.eval()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    module_names = {id(m): n for n, m in model.named_modules()}
    linears = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = f"{module_names[id(model.get_input_embeddings())]}.weight" if (mod is head and tied) \
                else f"{mod_name}.weight"
            if names is None or key in names:
                linears[key] = mod
    passes = _passes(list(linears.items()), HESSIAN_MEMORY_SHARE * psutil.virtual_memory().available)
    rows = budget_rows(sequences, token_budget)
    out: dict[str, torch.Tensor] = {}
    with bar_of(total=len(passes) * sum(map(len, rows)), desc="gptq hessians", unit="tok", enabled=progress,
                leave=False) as bar:
        for group in passes:
            out.update(_one_pass(model, dict(group), head, rows, bar))
    return out


def _passes(linears: list, budget: float) -> list[list]:
    """Consecutive linears grouped so that each group's matrices (an upper bound: shared inputs counted once
    each) stay within `budget` bytes; one group at least per pass."""
    out: list[list] = [[]]
    size = 0
    for item in linears:
        need = hessian_bytes([item[1].in_features])
        if out[-1] and size + need > budget:
            out.append([])
            size = 0
        out[-1].append(item)
        size += need
    return out


def _one_pass(model, linears: dict, head, rows, bar) -> dict[str, torch.Tensor]:
    from formats.gguf.imatrix import calibration_forward

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}  # a linear reading the same tensor as the one before it -> that one's name
    last: list = [None, None]  # the last input seen and who read it (q/k/v and gate/up run back to back)

    def add(name: str, x: torch.Tensor, real: torch.Tensor) -> None:
        if x is last[0] and last[1] != name:
            alias[name] = last[1]
            return
        last[:] = [x, name]
        x = x.detach().reshape(-1, x.shape[-1])[real].to(torch.float32)
        sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    head_name = next((name for name, mod in linears.items() if mod is head), None)
    calibration_forward(model, rows, {n: m for n, m in linears.items() if m is not head}, add, head_name, bar)
    means = {name: s / counts[name] for name, s in sums.items()}
    return {name: means[alias.get(name, name)] for name in linears if alias.get(name, name) in means}
