"""Load a causal LM from an HF dir in a given dtype without holding the whole checkpoint mapped meanwhile.

    from formats.hf.load import load_causal_lm
    model = load_causal_lm("merged/", "bfloat16")     # the importance matrix's model, from a float32 merge

transformers maps each safetensors file and converts tensor by tensor; every page it touched stays resident
until the load ends, so a float32 checkpoint loaded in bfloat16 peaks at the file plus the model (1.18B
bench merge: 7.0 GB for a 2.4 GB model). Where the dtype changes, this reads each tensor with pread, converts
it and drops the original: the peak is the model plus one tensor (2.6 GB there; the load takes ~3 s more).
Where no tensor changes dtype, transformers' own mapped load is kept: its tensors are the file's pages, with
no copy at all.

    model = load_float32_compute("merged/")           # a bf16 merge computed in float32 (no native bf16)

A 16-bit checkpoint that must compute in float32 (a CPU without native bf16, where torch's emulated bf16
matmul runs at a fifth of float32's) keeps its linear weights in 16 bits and upcasts each one for its own
forward: the float32 load's computation bit for bit (16-bit -> float32 is exact) in about half the memory.
"""

from __future__ import annotations

from pathlib import Path

from lorax_common.files import weight_files
from lorax_common.memory import ReusedBuffer

# safetensors dtype names -> torch dtype names
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def checkpoint_dtypes(hf_dir: Path) -> set[str]:
    """The torch dtype names of every floating tensor in the dir's safetensors files (headers only)."""
    from safetensors import safe_open

    out: set[str] = set()
    for f in weight_files(hf_dir):
        with safe_open(str(f), framework="pt") as fh:
            out |= {_DTYPES.get(fh.get_slice(k).get_dtype(), "other") for k in fh.keys()}
    return out


def load_causal_lm(hf_dir: str | Path, dtype: str):
    """AutoModelForCausalLM of `hf_dir` in `dtype` (eval mode not set: callers do)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    hf_dir = Path(hf_dir)
    if checkpoint_dtypes(hf_dir) <= {dtype, "other"}:
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    config = AutoConfig.from_pretrained(hf_dir)
    target = getattr(torch, dtype)
    state: dict = {}
    for f in weight_files(hf_dir):
        with safe_open(str(f), framework="pt", device="cpu", backend="pread") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                state[k] = t.to(target) if t.is_floating_point() else t
    # transformers takes the tensors of a state_dict as the parameters (no second copy)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, dtype=target,
                                                                    state_dict=state)


def load_float32_compute(hf_dir: str | Path):
    """The model computing in float32, as load_causal_lm(hf_dir, "float32") computes, bit for bit. Where every
    floating tensor of the checkpoint is bf16 (or every one f16), nn.Linear weights stay in that dtype and are
    upcast per forward (1.18B: 2.4 GB resident instead of 4.7 GB, plus the running weight's float32 copy);
    everything else (embeddings, norms, buffers) is float32, so activations are float32 throughout."""
    import torch

    stored = checkpoint_dtypes(Path(hf_dir)) - {"other"}
    if len(stored) != 1 or stored <= {"float32", "float64"}:
        return load_causal_lm(hf_dir, "float32")
    model = load_causal_lm(hf_dir, stored.pop())
    upcast = WeightUpcast()  # shared by this model's layers only: freed with the model
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = _upcasting_forward(mod, upcast)  # this instance only: the class stays untouched
            continue
        for group in (mod._parameters, mod._buffers):
            for t in group.values():
                if t is not None and t.is_floating_point():
                    t.data = t.data.float()  # in place: a weight tied to a Linear's stays the same Parameter
    return model


class WeightUpcast:
    """A model's float32 copy of the weight running now, in one buffer per thread (lorax_common.memory.ReusedBuffer)
    overwritten layer by layer and freed with the model. A fresh float32 copy per call is fresh pages from the
    kernel for every weight over lorax's 8 MiB mmap threshold: 1.18B bench, a 600-token forward 11.1 -> 9.9 s,
    page faults 1.26M -> 0.46M, the same output bit for bit."""

    def __init__(self) -> None:
        self.buffer = ReusedBuffer()

    def __call__(self, weight):
        import torch

        if weight.dtype == torch.float32 or torch.is_grad_enabled():
            return weight.float()  # as is, or (autograd keeps the weight it multiplied) a tensor of its own
        return self.buffer.take(weight.numel()).view(weight.shape).copy_(weight)


def _upcasting_forward(mod, upcast: WeightUpcast):
    """mod's forward on its weight upcast to float32. It holds mod weakly: a module whose own attribute referred
    back to it would be a reference cycle, and every layer of a 1.18B model in one would stay resident until
    a full collection."""
    import weakref

    import torch.nn.functional as F

    ref = weakref.ref(mod)

    def forward(x):
        m = ref()
        return F.linear(x, upcast(m.weight), None if m.bias is None else m.bias.float())

    return forward
