"""The reference: the model that was trained, rebuilt from an adapter directory.

    from exporter.gate.reference import read_adapter, load_reference
    info = read_adapter("adapter/")                      # lorax.json, or --trained-on for plain PEFT dirs
    model, tokenizer = load_reference(info)               # 4-bit base exactly as in training + the adapter

Used by `lorax merge` (what was trained on, which base tensors were quantized, `--merge-base auto`'s
yardstick) and by the parity gate. The one invariant (../shared/DESIGN.md): the reference is the base
loaded exactly as in training (NF4/FP4, blocksize, double quant, compute dtype, load dtype) with the
adapter on top; every artifact is measured against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import LoraxError
from lorax_common import base_as_trained, record
from lorax_common.errors import UserError
from lorax_common.files import check_tokenizer_files, read_json_object, safetensors_header, weight_files
from lorax_common.record import FLOAT_DTYPES, TRAINED_ON

# PEFT types other than plain LoRA, by the name users know them by: merging them needs other math.
PEFT_TYPE_NAMES = {"LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3", "ADALORA": "AdaLoRA", "VERA": "VeRA",
                   "OFT": "OFT", "BOFT": "BOFT", "XLORA": "X-LoRA", "PROMPT_TUNING": "prompt tuning",
                   "PREFIX_TUNING": "prefix tuning", "P_TUNING": "P-tuning", "RANDLORA": "RandLoRA"}
# LoRA config switches that change the math of the update (value counts when truthy) -> their name
UNSUPPORTED_LORA_FEATURES = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "layer_replication": "layer replication",
                             "alora_invocation_tokens": "aLoRA", "trainable_token_indices": "trainable tokens",
                             "target_parameters": "LoRA on parameters (target_parameters)",
                             "arrow_config": "Arrow routing", "use_bdlora": "BD-LoRA"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class TrainedOn:
    """How the base was loaded when the adapter was trained."""

    method: str  # "bnb-4bit" or "none"
    quant_type: str | None = None  # "nf4" | "fp4"
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: str = "float32"
    quant_storage: str = "uint8"
    # dtype transformers cast the base to at load time; bnb quantized the weights after that cast
    load_dtype: str = "float32"
    torch_threads: int | None = None  # of the training process (see exporter.merge.quant4.Quant4Spec.threads)

    @property
    def quantized(self) -> bool:
        return self.method == "bnb-4bit"

    def label(self) -> str:
        return f"{self.quant_type}{'+dq' if self.double_quant else ''}" if self.quantized else "none"

    def quant_spec(self):
        import torch

        from exporter.merge.quant4 import Quant4Spec

        return Quant4Spec(self.quant_type, self.blocksize, self.double_quant, getattr(torch, self.load_dtype),
                          self.torch_threads)

    def bnb_config(self):
        from lorax_common.base_as_trained import bnb_config

        try:
            return bnb_config(self.quantization())
        except UserError as e:
            raise LoraxError(str(e)) from None

    def quantization(self) -> record.Quantization:
        return record.Quantization(self.method, self.quant_type, self.blocksize, self.double_quant,
                                   self.compute_dtype, self.quant_storage, self.load_dtype)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AdapterInfo:
    adapter_dir: Path
    base_dir: Path
    peft_config: dict[str, Any]
    trained_on: TrainedOn
    lorax: record.AdapterRecord | None = None  # the adapter's lorax.json; None for a plain PEFT dir
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file, or one line naming it (missing, not JSON, not UTF-8, a list instead of an object)."""
    try:
        return read_json_object(path, what)
    except UserError as e:
        raise LoraxError(str(e)) from None


def check_peft_config(cfg: dict[str, Any], where: Path) -> None:
    """Refuse adapters whose update is not plain LoRA (one line naming the feature)."""
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        name = PEFT_TYPE_NAMES.get(ptype, ptype or "unknown")
        raise LoraxError(f"{where} is a {name} adapter; lorax merge supports LoRA adapters only "
                         "(re-train with a LoRA config)")
    for key, name in UNSUPPORTED_LORA_FEATURES.items():
        if cfg.get(key):
            raise LoraxError(f"{where} uses {name} ({key}), which lorax merge does not support; "
                             "re-train without it")


def trained_on_from_lorax(q: record.Quantization, base_storage: str) -> TrainedOn:
    if q.method == "none":
        return TrainedOn("none", load_dtype=q.load_dtype or q.compute_dtype or base_storage)
    compute = q.compute_dtype or "float32"
    # A QLoRA run loads the base in its compute dtype unless lorax.json says otherwise.
    return TrainedOn("bnb-4bit", q.quant_type, q.blocksize, q.double_quant, compute, q.quant_storage,
                     q.load_dtype or compute, q.torch_threads)


def trained_on_from_flag(flag: str, double_quant: bool, load_dtype: str) -> TrainedOn:
    if flag == "none":
        return TrainedOn("none", load_dtype=load_dtype)
    return TrainedOn("bnb-4bit", flag, 64, double_quant, "float32", "uint8", load_dtype)


def read_adapter(adapter_dir: str | Path, trained_on: str | None = None, double_quant: bool = False,
                 base_dir: str | Path | None = None) -> AdapterInfo:
    """Read an adapter dir (lorax's or plain PEFT) and resolve its base and training quantization."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LoraxError(f"{adapter_dir} is not a directory; pass the adapter directory `lorax train` wrote")
    cfg = _read_json(adapter_dir / "adapter_config.json", "not a PEFT adapter directory (expected adapter_config.json)")
    check_peft_config(cfg, adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).exists():
        raise LoraxError(f"{adapter_dir / ADAPTER_WEIGHTS} is missing; save the adapter with safetensors "
                         "(PEFT's default) and try again")
    safetensors_header(adapter_dir / ADAPTER_WEIGHTS)
    check_tokenizer_files(adapter_dir)  # merge ships these files: a broken one is refused, not copied
    try:
        meta = record.read(adapter_dir)
    except UserError as e:
        raise LoraxError(str(e)) from None
    recorded_base = (meta.base["path"] if meta else None) or cfg.get("base_model_name_or_path")
    if not base_dir and not recorded_base:
        # Path("") is ".": without this, a run from inside some model dir would merge against that model
        raise LoraxError(f"{adapter_dir} records no base model (no base_model_name_or_path in adapter_config.json, "
                         "no lorax.json); pass --base DIR")
    base = Path(base_dir or recorded_base)
    if not base.is_dir() or not (base / "config.json").exists():
        raise LoraxError(f"base model {base} is not a local model directory; pass --base DIR")
    weight_files(base)  # index entries inside the dir, headers that fit their files
    check_tokenizer_files(base)
    storage = base_storage_dtype(base)
    if meta is not None:
        recorded = trained_on_from_lorax(meta.quantization, storage)
        if trained_on is not None and trained_on != (recorded.quant_type or "none"):
            raise LoraxError(f"--trained-on {trained_on} contradicts {adapter_dir / 'lorax.json'} "
                             f"({recorded.label()}); drop --trained-on for lorax adapters")
        return AdapterInfo(adapter_dir, base, cfg, recorded, meta)
    if trained_on is None:
        raise LoraxError(f"{adapter_dir} has no lorax.json, so how its base was quantized in training is "
                         "unknown; pass --trained-on nf4|fp4|none (and --double-quant if it was used)")
    if trained_on not in TRAINED_ON:
        raise LoraxError(f"--trained-on {trained_on!r} is not one of {', '.join(TRAINED_ON)}")
    # transformers 5 loads a checkpoint in its stored dtype unless told otherwise.
    info = AdapterInfo(adapter_dir, base, cfg, trained_on_from_flag(trained_on, double_quant, storage))
    info.notes.append(f"plain PEFT adapter: trained on {info.trained_on.label()} (from --trained-on), "
                      f"load dtype assumed {storage}")
    return info


def base_storage_dtype(base_dir: Path) -> str:
    """The dtype the base's weights are stored in (config.json's dtype / torch_dtype, else float32)."""
    cfg = _read_json(base_dir / "config.json", "not a Hugging Face model directory")
    text = cfg.get("text_config") or {}
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return dtype if dtype in FLOAT_DTYPES else "float32"


@dataclass(frozen=True)
class BaseLayout:
    """What training-time loading did to the base, found on a weightless (meta) copy of the model."""

    quantized: frozenset[str]  # checkpoint keys of the weights bnb turned into 4-bit (Linear4bit)
    input_embeddings: str | None  # e.g. "model.embed_tokens.weight"
    output_embeddings: str | None  # e.g. "lm_head.weight"
    tied: bool


def base_layout(base_dir: Path, trained_on: TrainedOn) -> BaseLayout:
    """Ask transformers' own bnb quantizer which linears it quantizes, on a model without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    quantized: set[str] = set()
    if trained_on.quantized:
        import bitsandbytes as bnb
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(trained_on.bnb_config(), pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=getattr(torch, trained_on.load_dtype),
                                   device_map={"": "cpu"}, checkpoint_files=None, use_kernels=False)
        quantized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return BaseLayout(frozenset(quantized),
                      f"{names[id(inp)]}.weight" if inp is not None and id(inp) in names else None,
                      f"{names[id(out)]}.weight" if out is not None and id(out) in names else None, tied)


def load_reference(info: AdapterInfo, dtype: str | None = None, tokenizer=None):
    """(model, tokenizer): the base loaded as in training, the adapter on top, eval mode, on CPU.

    `dtype` overrides the load dtype (e.g. to measure how much of a gap is the reference's own rounding);
    `tokenizer`: load_tokenizer(info) when the caller already has it (the gate built its samples with it).
    """
    from peft import PeftModel

    try:
        base = base_as_trained.load(info.base_dir, info.trained_on.quantization(), dtype or info.trained_on.load_dtype)
    except UserError as e:
        raise LoraxError(str(e)) from None
    _off_the_file(base)
    model = PeftModel.from_pretrained(base, info.adapter_dir)
    model.eval()
    return model, tokenizer if tokenizer is not None else load_tokenizer(info)


def _off_the_file(model) -> None:
    """Copy the tensors the base load left as views of its mapped checkpoint (embeddings, norms, the head:
    everything not 4-bit) into memory of their own, so the mapping closes. Otherwise every page the 4-bit
    quantization read stays resident for as long as the reference runs (1.18B bench, bf16 base: 2.2 GB
    for 0.4 GB of tensors still in use). The values are the same; only where they live changes."""
    import bitsandbytes as bnb

    from lorax_common.memory import release

    for p in model.parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.clone()
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.clone()
    release()


def load_tokenizer(info: AdapterInfo):
    """The adapter's tokenizer when it saved one (training may add a chat template), else the base's."""
    from transformers import AutoTokenizer

    src = info.adapter_dir if (info.adapter_dir / "tokenizer_config.json").exists() else info.base_dir
    return AutoTokenizer.from_pretrained(src)


def reference_runner(info: AdapterInfo, dtype: str | None = None, tokenizer=None):
    """The reference as a `formats.runner.Runner` (what the gate compares every artifact against)."""
    from formats.hf.runner import HFRunner

    model, tokenizer = load_reference(info, dtype, tokenizer)
    # torch's own bf16 kernels: fast_reference.prepare proves the dequantized-once layers against bitsandbytes'
    # path in them first, then switches to float32 accumulation where the CPU has no native bf16
    return HFRunner(info.adapter_dir, name="reference", model=model, tokenizer=tokenizer, float32_accumulate=False)


# Used when an adapter dir carries no eval.jsonl: short, varied text the model family has seen.
CALIBRATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Then it ran into the forest and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    '{"name": "Ada", "city": "London", "age": 36, "languages": ["English", "French"]}',
    "Question: What is the capital of France?\nAnswer: The capital of France is",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Write a short poem about the sea.\nThe waves roll in, the waves roll out,",
    "Numbers: 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144,",
    "Grüße aus München! Das Wetter ist heute schön, und wir gehen",
)


def calibration_ids(info: AdapterInfo, tokenizer, n: int = 8, max_tokens: int = 128) -> list[list[int]]:
    """Token ids to compare models on: the adapter's held-out examples when present, else built-in prompts."""
    texts: list[str] = []
    eval_file = info.adapter_dir / ((info.lorax.data if info.lorax else {}).get("eval_file") or "eval.jsonl")
    if eval_file.exists():
        from train.data import load

        texts = [_example_text(row, tokenizer) for row in load(eval_file).rows[:n]]  # errors name file and line
    texts = texts or list(CALIBRATION_PROMPTS[:n])
    ids = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in texts]
    return [i for i in ids if len(i) >= 2]


def _example_text(ex: dict[str, Any], tokenizer) -> str:
    """One JSONL example (messages | prompt_completion | text) as the text the model was trained on."""
    if "messages" in ex and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(ex["messages"], tokenize=False)
    if "prompt" in ex:
        return f"{ex['prompt']}{ex.get('completion', '')}"
    return str(ex.get("text", ""))


def score_candidates(info: AdapterInfo, dirs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Parity of each candidate dir against the reference on calibration ids, one model in memory at a time."""
    import gc

    from exporter.gate.metrics import compare
    from formats.hf.runner import HFRunner

    ref = reference_runner(info)
    ids = calibration_ids(info, ref.tokenizer)
    ref_logits = [ref.logits(i) for i in ids]
    del ref
    gc.collect()
    scores = {}
    for name, d in dirs.items():
        runner = HFRunner(d, dtype="float32")
        scores[name] = compare(ref_logits, [runner.logits(i) for i in ids], ids).as_dict()
        del runner
        gc.collect()
    return scores
