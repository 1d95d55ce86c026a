"""`lorax check`: the parity gate as a function the CLI and the export pipeline share.

    lorax check adapter/ dist/model-q8_0.gguf dist/onnx dist/merged --report dist/
    lorax check adapter/ dist/base-as-trained-f32.gguf --lora dist/model-lora-f32.gguf

    from exporter.gate.check import GateOptions, check
    report = check("adapter/", ["dist/model-q8_0.gguf"], GateOptions(report_dir="dist/"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import LoraxError
from exporter.gate.evaluate import Report, Yardstick, run_gate
from exporter.gate.reference_store import ReferenceSource
from exporter.gate.registry import lookup
from exporter.gate.report import write_report
from exporter.gate.samples import build, load_rows
from exporter.gate.targets import Target, open_target
from exporter.merge.api import MergeOptions
from lorax_common.timing import Stopwatch


@dataclass
class GateOptions:
    """How the gate rebuilds the reference and what it measures."""

    base: str | Path | None = None  # base dir, for adapters without lorax.json
    trained_on: str | None = None  # nf4 | fp4 | none, for adapters without lorax.json
    double_quant: bool = False  # with trained_on nf4/fp4
    prompts: str | Path | None = None
    report_dir: str | Path | None = None
    gen_tokens: int = 16
    max_samples: int | None = None
    overrides: dict = field(default_factory=dict)
    floor: str = "auto"
    lora: str | Path | None = None  # a LoRA GGUF applied to every GGUF artifact (llama.cpp --lora)
    merged_dir: Path | None = None  # the merged weights the artifacts came from (the pipeline knows them)
    recipes: dict = field(default_factory=dict)  # GGUF type -> Recipe the target was quantized with (the floor too)
    clock: Stopwatch | None = None  # the caller's stage timing (the export's build); the gate's stages join it
    reuse_reference: bool = True  # reuse stored reference outputs (exporter.gate.reference_store)
    # format -> (file, type): a lossless file of the merged weights the caller's writer already made (the
    # export's GGUF intermediate), measured as that format's control instead of writing another
    controls: dict = field(default_factory=dict)

    def merge_options(self) -> MergeOptions:
        """How the floor re-merges the adapter when it needs to: as read here, quietly, unverified (the
        reference already read the same base)."""
        return MergeOptions(trained_on=self.trained_on, double_quant=self.double_quant, base_dir=self.base,
                            verify=False, progress=False)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


# adapter files whose content decides the reference's outputs (hashed; they are small)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "lorax.json")


def reference_source(source: str | Path, opts: GateOptions) -> ReferenceSource:
    """The model as trained, unloaded: for an adapter dir, its base quantized as in training + the adapter;
    for a plain HF model dir, that model itself (float32). Loading waits until outputs must be computed."""
    from dataclasses import asdict

    from exporter.gate.reference_store import dir_identity, file_identity

    source = Path(source)
    if is_adapter(source):
        from exporter.gate.reference import load_tokenizer, read_adapter
        from exporter.gate.reference import reference_runner as adapter_reference

        info = read_adapter(source, opts.trained_on, opts.double_quant, opts.base)
        identity = {"adapter": [file_identity(source / n, by_content=True) for n in ADAPTER_FILES
                                if (source / n).is_file()],
                    "base": dir_identity(info.base_dir), "trained_on": asdict(info.trained_on)}
        tok = load_tokenizer(info)  # the samples' tokenizer, and the reference's: loaded once
        return ReferenceSource("reference", tok, identity, lambda: adapter_reference(info, tokenizer=tok))
    if (source / "config.json").is_file():
        from transformers import AutoTokenizer

        from formats.hf.runner import HFRunner

        name = f"reference:{source.name}"
        return ReferenceSource(name, AutoTokenizer.from_pretrained(source), {"hf": dir_identity(source)},
                               lambda: HFRunner(source, name=name))
    raise LoraxError(f"{source}: neither an adapter dir (adapter_config.json) nor an HF model dir (config.json)")


def reference_runner(source: str | Path, opts: GateOptions):
    """The reference loaded now, as a formats.runner.Runner (for callers that run it themselves)."""
    return reference_source(source, opts).open()


def lora_pairing(lora: Path, floor) -> Target:
    """The same LoRA GGUF over a GGUF of the original base: ungated, to show the cost of the wrong base."""
    from exporter.gate.targets import gguf_context
    from formats.gguf.runner import GGUFRunner

    def opener(tokens: int | None):
        return GGUFRunner(floor.original_base_gguf(), lora_path=lora, name=f"original base + {lora.name}",
                          **gguf_context(tokens))

    return Target(f"original-base + {lora.name}", "gguf", "f32", lora, lora=lora, gated=False, opener=opener,
                  note="the LoRA over a GGUF of the original (unquantized) base, the naive merge "
                       "llama.cpp computes when the LoRA is paired with the wrong base")


def _targets(source: Path, artifacts: list, opts: GateOptions, floor) -> list[Target]:
    lora = Path(opts.lora) if opts.lora else None
    targets = [a if isinstance(a, Target) else open_target(a, lora if str(a).endswith(".gguf") else None)
               for a in artifacts]
    for t in targets:
        lookup(t.format, t.dtype)  # a type without a threshold row is refused before anything runs
    if lora is not None and floor is not None and floor.adapter_dir is not None and _trained_quantized(source, opts):
        targets.append(lora_pairing(lora, floor))
    return targets


def _trained_quantized(source: Path, opts: GateOptions) -> bool:
    from exporter.gate.reference import read_adapter

    return read_adapter(source, opts.trained_on, opts.double_quant, opts.base).trained_on.quantized


def check(source: str | Path, artifacts: list, opts: GateOptions | None = None) -> Report:
    """Gate every artifact against the model as trained; write the report when `opts.report_dir` is set.
    The verdict is in the returned Report (callers decide the exit code)."""
    from exporter.gate.floor import Floor

    opts = opts or GateOptions()
    source = Path(source)
    if not artifacts:
        raise LoraxError("no artifacts to check; pass one or more .gguf files, ONNX dirs or HF dirs")
    ref = reference_source(source, opts)
    rows, where = load_rows(opts.prompts, source)
    try:
        samples = build(rows, ref.tokenizer, max_samples=opts.max_samples)
    except ValueError as e:
        raise LoraxError(f"{where}: {e}") from None
    # the control needs the merged weights; the floor, a base to quantize (only an adapter reference has one)
    probe = Floor(samples, adapter_dir=source if is_adapter(source) else None,
                  merged_dir=opts.merged_dir or (None if is_adapter(source) else source),
                  merge=opts.merge_options(), mode=opts.floor, recipes=opts.recipes,
                  vocab=len(ref.tokenizer), controls=opts.controls)
    try:
        targets = _targets(source, artifacts, opts, probe)
        yard = Yardstick(samples, ref.tokenizer, opts.gen_tokens)
        report = run_gate(ref, targets, yard, where, opts.overrides, probe, reuse=opts.reuse_reference)
    finally:
        probe.close()
    if opts.clock is not None:  # one timeline: the export's build stages, then the gate's
        opts.clock.add(report.timing["stages"], report.timing.get("peak_rss_after_mib"))
        report.timing = opts.clock.as_dict()
    if opts.report_dir is not None:
        write_report(report, opts.report_dir)
    return report
