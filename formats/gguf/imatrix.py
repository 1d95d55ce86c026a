"""Importance matrices: mean x² per input column of every linear, for libllama's quantizer.

    lorax export ADAPTER --out dist --gguf --quant q4_k_m            # --imatrix auto --imatrix-tokens auto
    lorax export ADAPTER --out dist --gguf --quant q4_k_m --calibration my.jsonl --imatrix-tokens 30000
    llama-quantize --imatrix dist/imatrix.gguf merged-f32.gguf out.gguf Q4_K_M   # the same file, llama.cpp's tool

    from formats.gguf.imatrix import collect_imatrix, write_imatrix, read_imatrix
    imx = collect_imatrix("merged/", [ids, ...], token_budget=30_000)   # torch hooks on nn.Linear inputs
    write_imatrix(imx, "imatrix.gguf"); assert read_imatrix("imatrix.gguf").values().keys() == imx.values().keys()

The quantizer weighs each weight's rounding error by how large its input column runs on real data
(llama.cpp PR 4861), so the matrix should come from text like the model will see: the fine-tune's own
training rows, rendered as training rendered them (exporter.export.calibration). It is computed on the merged
model in torch (the trained model, not a quantized copy) and keyed by GGUF tensor names through
formats.gguf.arch.gguf_tensor_name. Input columns are not permuted by the writer (only q/k *rows* are),
so a column statistic of the HF weight is the statistic of the GGUF weight.

File format (llama.cpp tools/imatrix, read by common/imatrix-loader.cpp): a GGUF with `general.type =
imatrix`, `imatrix.datasets` (strings), `imatrix.chunk_count`, `imatrix.chunk_size` (u32) and per weight two
F32 tensors `<name>.in_sum2` (sum of x² per column) and `<name>.counts` (tokens seen). The quantizer gets
`in_sum2 / counts` in float32, computed here by `Imatrix.values()` exactly as llama-quantize computes it
from the file, so quantizing from memory and from the written file gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.errors import FormatError

DEFAULT_TOKEN_BUDGET = 32_768  # ~the 28.6k tokens of 300 demo rows: past that the matrix barely moves

# --imatrix-tokens auto: a compute budget, not a fixed count. The calibration forward costs 2 x (the blocks'
# linear weights) FLOPs a token, so a fixed count makes the matrix a fixed multiple of what writing and
# quantizing the GGUF cost, at any size: 32,768 tokens through a 1.18B model is ~8 minutes of float32 on 2 CPU
# cores (67 tokens/s measured), four to five times the peer path's whole export. The budget holds token x weight
# at what DEFAULT_TOKEN_BUDGET costs SmolLM2-135M (106M linear weights in its blocks), never below
# MIN_AUTO_TOKENS: 4,096 from ~0.85B up.
# Measured on the demo fine-tune (q4_k_m, lorax's default recipe, 50 held-out prompts, mean KLD vs the trained
# model by budget): 1,024 tokens 0.0836, 2,048 0.0932, 4,096 0.0989, 8,192 0.0995, 16,384 0.0798, 28,628 (all)
# 0.0863; top-1 85.8-91.6%; plain q4_k_m 0.2038. No trend past 1k tokens: the spread is rounding flips.
# The matrix itself against the one from all 28,628 tokens (relative L2 of each tensor's values, median / worst
# tensor): 1,024 tokens 0.9% / 18.7%, 2,048 0.8% / 14.1%, 4,096 0.4% / 7.7%, 8,192 0.3% / 4.7%.
AUTO_TOKEN_WEIGHTS = 32_768 * 106_168_320
MIN_AUTO_TOKENS = 4_096


def auto_token_budget(linear_weights: int) -> int:
    """The default calibration budget for a model whose blocks multiply `linear_weights` weights per token."""
    return max(MIN_AUTO_TOKENS, min(DEFAULT_TOKEN_BUDGET, AUTO_TOKEN_WEIGHTS // max(1, linear_weights)))


def block_linear_weights(hf_dir: str | Path) -> int:
    """How many weights the decoder blocks multiply per token: every 2-D weight with a GGUF block name, counted
    from the safetensors headers (nothing is loaded). Embeddings and the output head are outside the blocks."""
    from safetensors import safe_open

    from formats.gguf.arch import arch_spec, gguf_tensor_name
    from formats.gguf.writer import read_config
    from lorax_common.files import weight_files

    spec = arch_spec(read_config(Path(hf_dir)))
    total = 0
    for f in weight_files(hf_dir):
        with safe_open(str(f), framework="np") as fh:
            for name in fh.keys():
                mapped = gguf_tensor_name(spec, name)
                shape = fh.get_slice(name).get_shape()
                if mapped is not None and mapped[2] is not None and len(shape) == 2:
                    total += int(shape[0]) * int(shape[1])
    return total


def token_budget(hf_dir: str | Path, requested: int | None) -> int:
    """`requested` (--imatrix-tokens N), or the auto budget for the model at `hf_dir` when None."""
    return requested if requested is not None else auto_token_budget(block_linear_weights(hf_dir))


def compute_dtype() -> str:
    """The dtype the calibration forward runs in: bfloat16 where the CPU multiplies it natively (AVX512-BF16 or
    AMX; 2.5x float32's matmul throughput on this project's 2-core EPYC), else float32 (emulated bf16 is slower).

    The matrix is a statistic that weighs rounding, not a computation the gate compares: from the demo's merge,
    bf16 moved its entries by ~3% (median, worst tensor) and the q4_k_m it weighs measured KLD 0.081 / top-1
    90.1% against the trained model vs 0.091 / 88.9% from the float32 forward (50 held-out prompts), in 30.5
    vs 54.1 s. llama.cpp's own tool runs on whatever type the GGUF holds (f16, q8_0, ...)."""
    from formats.hf.bf16_compute import native_bf16

    return "bfloat16" if native_bf16() else "float32"


@dataclass
class Imatrix:
    """Per GGUF weight name: float32 sum of x² per input column, and how many tokens went into it."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    def values(self) -> dict[str, np.ndarray]:
        """What the quantizer weighs by: in_sum2 / counts in float32 (1.0 where nothing was seen, as llama.cpp)."""
        out = {}
        for name, s in self.sums.items():
            s = np.asarray(s, dtype=np.float32)
            c = np.float32(self.counts[name])
            out[name] = (s / c).astype(np.float32) if c > 0 else np.ones_like(s)
        return out

    def digest(self) -> str:
        """sha256 of exactly what the quantizer receives (names and values), for cache keys."""
        import hashlib

        h = hashlib.sha256()
        for name, v in sorted(self.values().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
        return h.hexdigest()


# Padded tokens per forward: rows of ~50-100 tokens batched 5-10 at a time (1 row: ~2x slower). At 2048, a
# 1.18B model's 2048 x 5632 float32 activations were each fresh pages under the 8 MiB mmap threshold
# (lorax_common.memory): 2,048 bench tokens took 42.2-49.6 s (4 runs, sys 10-14 s), at 512 37.9-46.7 s (3 runs,
# sys 3-7 s), the GEMMs as fast at 512 rows.
BATCH_TOKENS = 512


def collect_imatrix(hf_dir: str | Path, sequences: Sequence[Sequence[int]], *,
                    token_budget: int = DEFAULT_TOKEN_BUDGET, datasets: Sequence[str] = (),
                    progress: bool = True, model=None, dtype: str | None = None) -> Imatrix:
    """Run `sequences` (token ids; the first `token_budget` tokens, in order) through the HF model at `hf_dir`
    and sum x² per input column of every nn.Linear that has a GGUF name.

    Sequences are right-padded into batches with an attention mask: under a causal mask no real token attends
    to a later pad, so each real position computes what it would alone, and the hooks drop the pad rows. The
    output projection is never run: its input is the decoder's last hidden state, summed directly (untied),
    or not collected at all (tied: it is token_embd, which llama.cpp's tool does not collect either).
    `dtype`: what the model loads and computes in (None: compute_dtype()); sums are float64 either way."""
    import torch

    from formats.gguf.arch import arch_spec, gguf_tensor_name, hparams
    from formats.gguf.writer import read_config
    from lorax_common.log import progress as bar_of
    from lorax_common.memory import heap_reuse

    if token_budget < 1:
        raise FormatError(f"imatrix token budget must be at least 1, got {token_budget}")
    cfg = read_config(Path(hf_dir))
    spec = arch_spec(cfg)
    if model is None:
        from formats.hf.load import load_causal_lm, load_float32_compute

        dtype = dtype or compute_dtype()
        model = load_float32_compute(hf_dir) if dtype == "float32" else load_causal_lm(hf_dir, dtype)
    model.eval()
    head = model.get_output_embeddings()
    tied = hparams(cfg).tied
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    # q/k/v (and gate/up) get the very same input tensor: square and sum it once for all of them
    last: dict = {"x": None}

    def add(name: str, x: torch.Tensor, real: torch.Tensor) -> None:
        if x is not last["x"]:
            flat = x.detach().reshape(-1, x.shape[-1])
            flat = flat if bool(real.all()) else flat[real]
            last.update(x=x, sq=column_squares(flat), n=flat.shape[0])
        sums[name] = sums[name] + last["sq"] if name in sums else last["sq"]
        counts[name] = counts.get(name, 0) + last["n"]

    inputs, out_name = {}, None
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        mapped = gguf_tensor_name(spec, f"{mod_name}.weight")
        if mapped is None:
            continue
        if mod is head:
            out_name = None if tied else mapped[0]
        else:
            inputs[mapped[0]] = mod
    rows = budget_rows(sequences, token_budget)
    # every batch makes the same large activations: from reused heap pages, not fresh ones (lorax_common.memory)
    with heap_reuse(), bar_of(total=sum(map(len, rows)), desc="imatrix", unit="tok", enabled=progress,
                              leave=False) as bar:
        calibration_forward(model, rows, inputs, add, out_name, bar)
    last.clear()
    if not sums:
        raise FormatError("no calibration tokens went through the model; the importance matrix is empty")
    return Imatrix({k: v.to(torch.float32).numpy() for k, v in sums.items()}, counts, list(datasets),
                   len(rows), max(map(len, rows)))


# Rows squared at a time: ~4 MiB of float64, so the temporaries come from the heap, not fresh pages. Squaring a
# whole 2048 x 5632 batch input at once took 93 ms (45k page faults per call under lorax's 8 MiB mmap threshold,
# lorax_common.memory); in chunks 6.6 ms: ~8 s of the 1.18B bench's importance matrix.
SQUARE_CHUNK_BYTES = 4 << 20


def column_squares(flat):
    """Sum of x² down each column of a 2-d tensor, in float64. Each square is exact: a 16-bit float's square
    fits float32's mantissa, float32's needs float64."""
    import torch

    wide = torch.float32 if flat.dtype in (torch.bfloat16, torch.float16) else torch.float64
    rows = max(1, SQUARE_CHUNK_BYTES // (wide.itemsize * max(1, flat.shape[1])))
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    for part in flat.split(rows):
        part = part.to(wide, copy=True)  # a copy of our own: squared in place, never the caller's activations
        total += torch.sum(part.mul_(part), 0, dtype=torch.float64)
    return total


def calibration_forward(model, rows: list[list[int]], inputs: Mapping[str, object], add: Callable,
                        head: str | None, bar) -> None:
    """Run `rows` through the model's decoder (blocks and final norm; the output projection never runs) in
    padded_batches, calling add(name, x, real) with the input x of each module in `inputs` (name -> module)
    and the batch's real-token mask, flattened (x.reshape(-1, K)[real] drops the pads). `head`: the name
    under which the decoder's last hidden state, the output projection's input, is added; None skips it."""
    import torch

    real: list = [None]
    hooks = [mod.register_forward_pre_hook(lambda _m, args, n=name: add(n, args[0], real[0]))
             for name, mod in inputs.items()]
    decoder = model.get_decoder()
    try:
        with torch.inference_mode():
            for ids, mask in padded_batches(rows):
                real[0] = mask.reshape(-1).bool()
                # no KV cache: nothing reads it, and its per-layer tensors would sit between the activations
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                if head is not None:
                    add(head, hidden, real[0])
                bar.update(int(mask.sum()))
    finally:
        for h in hooks:
            h.remove()


def budget_rows(sequences: Sequence[Sequence[int]], token_budget: int) -> list[list[int]]:
    """The first `token_budget` tokens of `sequences`: whole rows in order, then the head of the last one."""
    rows, seen = [], 0
    for ids in sequences:
        ids = list(ids)[: token_budget - seen]
        if not ids:
            break
        rows.append(ids)
        seen += len(ids)
    return rows


def padded_batches(rows: list[list[int]]):
    """(ids, mask) long tensors of right-padded batches, rows sorted by length (similar lengths together:
    little padding). Under a causal mask no real token attends to a later pad, so each real position computes
    what it would alone; callers drop the pad rows by the mask."""
    import torch

    for batch in _batches(sorted(rows, key=len)):
        width = len(batch[-1])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        yield ids, mask


def _batches(rows: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive rows (sorted by length) grouped so that rows x longest stays within BATCH_TOKENS."""
    out: list[list[list[int]]] = []
    for r in rows:
        if out and (len(out[-1]) + 1) * len(r) <= BATCH_TOKENS:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def write_imatrix(imx: Imatrix, path: str | Path) -> Path:
    """Write `imx` as llama.cpp's GGUF imatrix file (tools/imatrix's layout)."""
    from gguf import GGUFWriter, Keys

    path = Path(path)
    w = GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop(Keys.General.ARCHITECTURE, None)  # llama.cpp's imatrix files carry no architecture
    w.add_type("imatrix")
    w.add_array(Keys.IMatrix.DATASETS, list(imx.datasets) or ["lorax"])
    w.add_uint32(Keys.IMatrix.CHUNK_COUNT, imx.chunk_count)
    w.add_uint32(Keys.IMatrix.CHUNK_SIZE, imx.chunk_size)
    for name in sorted(imx.sums):
        s = np.asarray(imx.sums[name], dtype=np.float32).reshape(1, -1)  # ggml ne = (n_cols, n_mat=1)
        w.add_tensor(f"{name}.in_sum2", s)
        w.add_tensor(f"{name}.counts", np.array([[imx.counts[name]]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix file (ours or llama-imatrix's); counts are rounded to integers as llama.cpp does."""
    from gguf import GGUFReader, Keys

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises bare ValueErrors on bad magic
        raise FormatError(f"{path}: not a GGUF imatrix file ({e}); legacy .dat files are not read") from None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = int(round(float(np.asarray(t.data).reshape(-1)[0])))
    missing = sorted(set(sums) ^ set(counts))
    if missing or not sums:
        raise FormatError(f"{path}: mismatched sums and counts for {', '.join(missing) or 'every tensor'}")

    def field_value(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    return Imatrix(sums, counts, list(field_value(Keys.IMatrix.DATASETS) or []),
                   int(field_value(Keys.IMatrix.CHUNK_COUNT) or 0), int(field_value(Keys.IMatrix.CHUNK_SIZE) or 0))


def c_imatrix(values: dict[str, np.ndarray]):
    """`values` as libllama's NULL-name-terminated `llama_model_imatrix_data` array; returns (array, keepalive):
    the float buffers must outlive the quantize call."""
    import ctypes

    import llama_cpp

    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for i, name in enumerate(sorted(values)):
        buf = np.ascontiguousarray(values[name], dtype=np.float32)
        keep.append(buf)
        arr[i].name = name.encode()
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    arr[len(values)].name = None
    return arr, keep


def hf_importance(imx: Imatrix, hf_dir: str | Path) -> dict[str, np.ndarray]:
    """The matrix keyed by HF weight names (model.layers.0.self_attn.q_proj.weight, ...) for the ONNX
    quantizer: every HF weight whose GGUF name has an entry. Columns need no remapping (see the module doc)."""
    import json

    from safetensors import safe_open

    from formats.gguf.arch import arch_spec, gguf_tensor_name
    from formats.gguf.writer import read_config

    spec = arch_spec(read_config(Path(hf_dir)))
    values = imx.values()
    out: dict[str, np.ndarray] = {}
    index = Path(hf_dir) / "model.safetensors.index.json"
    names = list(json.loads(index.read_text())["weight_map"]) if index.is_file() else []
    for shard in ([] if names else sorted(Path(hf_dir).glob("*.safetensors"))):
        with safe_open(str(shard), framework="np") as f:
            names += list(f.keys())
    for name in names:
        mapped = gguf_tensor_name(spec, name)
        if mapped and mapped[0] in values:
            out[name] = values[mapped[0]]
    return out
