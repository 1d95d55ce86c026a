"""Importance matrix: collection (mean x² per input column), the GGUF imatrix file, and libllama receiving it.

On the tiny model most K-quant rows fall back to legacy types (64-wide rows); those fallback types use the
matrix too, so "with a matrix the bytes differ" holds here as on real models.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from formats.errors import FormatError
from formats.gguf.export import GGUFOptions, export_gguf
from formats.gguf.imatrix import Imatrix, collect_imatrix, read_imatrix, write_imatrix
from formats.gguf.quantize import Recipe, quantize_gguf
from lorax_common.hashing import sha256_file


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 500, 40).tolist() for _ in range(5)]


@pytest.fixture(scope="module")
def imx(tiny_model_dir, model, seqs) -> Imatrix:
    return collect_imatrix(tiny_model_dir, seqs, token_budget=150, progress=False, model=model,
                           datasets=["train.jsonl"])


@pytest.fixture(scope="module")
def f32_gguf(tiny_model_dir, tmp_path_factory):
    out = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("imx-f32"), ["f32"], GGUFOptions(check_tokenizer=False,
                      progress=False))
    return out.files[0].path


def test_collection_is_the_hand_computed_sum_of_squares(imx, model, seqs):
    # budget 150 of 5 x 40 tokens: three whole sequences and 30 tokens of the fourth
    assert imx.tokens == 150 and imx.chunk_count == 4 and imx.chunk_size == 40
    layers = model.model.layers
    with torch.inference_mode():
        want_q = torch.zeros(64, dtype=torch.float64)
        for ids in [*seqs[:3], seqs[3][:30]]:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            h1 = out.hidden_states[1][0]  # input of layer 1
            x = layers[1].input_layernorm(h1).double()
            want_q += (x * x).sum(0)
        # layer 0's q_proj input is the normed embedding, computable without the forward
        emb = model.model.embed_tokens(torch.tensor([t for s in [*seqs[:3], seqs[3][:30]] for t in s]))
        x0 = layers[0].input_layernorm(emb).double()
        want_q0 = (x0 * x0).sum(0)
        # the untied output's input: the decoder's last (normed) hidden state, each sequence alone
        want_out = sum((model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].double() ** 2).sum(0)
                       for ids in [*seqs[:3], seqs[3][:30]])
    np.testing.assert_allclose(imx.sums["blk.0.attn_q.weight"], want_q0.numpy(), rtol=1e-5)
    np.testing.assert_allclose(imx.sums["blk.1.attn_k.weight"], want_q.numpy(), rtol=1e-5)
    np.testing.assert_allclose(imx.sums["output.weight"], want_out.numpy(), rtol=1e-5)
    assert imx.counts["blk.0.attn_q.weight"] == 150 == imx.counts["output.weight"]
    # q, k, v share one input; the value the quantizer gets is the mean
    np.testing.assert_array_equal(imx.sums["blk.0.attn_q.weight"], imx.sums["blk.0.attn_v.weight"])
    np.testing.assert_allclose(imx.values()["blk.0.attn_q.weight"], want_q0.numpy() / 150, rtol=1e-5)
    assert imx.sums["blk.0.ffn_down.weight"].shape == (192,)  # ffn_down's input is the 192-wide hidden
    # every linear with a GGUF name: 7 per block x 2 blocks + the untied output
    assert len(imx.sums) == 15 and "output.weight" in imx.sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_column_squares_in_chunks_is_the_float64_sum_and_leaves_its_input_alone(monkeypatch, dtype):
    """The per-column sum of squares, a few rows at a time (here 3 rows of 40 columns per chunk, the last
    partial): the exact squares summed in float64, and the activations it was handed unchanged."""
    import formats.gguf.imatrix as im

    monkeypatch.setattr(im, "SQUARE_CHUNK_BYTES", 3 * 40 * 8)
    flat = torch.randn(10, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = flat.clone()
    want = (flat.double() ** 2).sum(0)
    got = im.column_squares(flat)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert torch.equal(flat, before)
    assert torch.equal(im.column_squares(flat[:0]), torch.zeros(40, dtype=torch.float64))


def test_gguf_imatrix_file_round_trip(imx, tmp_path):
    path = write_imatrix(imx, tmp_path / "imatrix.gguf")
    r = GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.datasets"].contents() == ["train.jsonl"]
    assert r.fields["imatrix.chunk_count"].contents() == 4
    names = {t.name: t for t in r.tensors}
    assert len(names) == 30
    t = names["blk.0.ffn_down.weight.in_sum2"]
    assert t.tensor_type == GGMLQuantizationType.F32 and list(t.shape) == [192, 1]  # ggml ne: (cols, n_mat)
    assert float(names["blk.0.ffn_down.weight.counts"].data.reshape(-1)[0]) == 150.0
    back = read_imatrix(path)
    assert back.counts == imx.counts and back.chunk_count == 4 and back.chunk_size == 40
    for k, v in imx.values().items():
        np.testing.assert_array_equal(back.values()[k], v)


def test_bad_imatrix_files_are_refused(tmp_path, imx):
    (tmp_path / "x.dat").write_bytes(b"\x01\x00\x00\x00junk")
    with pytest.raises(FormatError, match="not a GGUF imatrix"):
        read_imatrix(tmp_path / "x.dat")
    half = Imatrix({"blk.0.attn_q.weight": imx.sums["blk.0.attn_q.weight"]}, {}, [], 1, 1)
    with pytest.raises(KeyError):
        write_imatrix(half, tmp_path / "half.gguf")


def test_quantizer_receives_the_matrix(imx, f32_gguf, tmp_path):
    plain = tmp_path / "plain.gguf"
    quantize_gguf(f32_gguf, plain, "q4_k_m", nthread=1)
    mem = tmp_path / "mem.gguf"
    quantize_gguf(f32_gguf, mem, "q4_k_m", nthread=1, recipe=Recipe(imatrix=imx))
    filed = tmp_path / "file.gguf"
    quantize_gguf(f32_gguf, filed, "q4_k_m", nthread=1,
                  recipe=Recipe(imatrix=read_imatrix(write_imatrix(imx, tmp_path / "imatrix.gguf"))))
    assert sha256_file(mem) != sha256_file(plain)  # the matrix changed the rounding
    assert sha256_file(mem) == sha256_file(filed)  # and the written file carries exactly that matrix
    # a different matrix gives different bytes: the quantizer reads the values, not just "some matrix"
    flat = Imatrix({k: np.ones_like(v) for k, v in imx.sums.items()}, dict(imx.counts))
    other = tmp_path / "flat.gguf"
    quantize_gguf(f32_gguf, other, "q4_k_m", nthread=1, recipe=Recipe(imatrix=flat))
    assert sha256_file(other) not in {sha256_file(mem), sha256_file(plain)}


def test_low_bit_iquants_need_the_matrix(imx, f32_gguf, tmp_path):
    with pytest.raises(FormatError, match="needs an importance matrix"):
        quantize_gguf(f32_gguf, tmp_path / "a.gguf", "iq3_xxs", nthread=1)
    quantize_gguf(f32_gguf, tmp_path / "b.gguf", "iq3_xxs", nthread=1, recipe=Recipe(imatrix=imx))
    assert (tmp_path / "b.gguf").stat().st_size > 0


def test_tensor_type_overrides_and_output_type(f32_gguf, tmp_path):
    out = tmp_path / "ovr.gguf"
    quantize_gguf(f32_gguf, out, "q4_0", nthread=1,
                  recipe=Recipe(tensor_types=((r"ffn_down", "q8_0"),), output_type="f16", embedding_type="q8_0"))
    types = {t.name: t.tensor_type for t in GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_up.weight"] == GGMLQuantizationType.Q4_0
    assert types["output.weight"] == GGMLQuantizationType.F16
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    with pytest.raises(FormatError, match="not offered"):
        quantize_gguf(f32_gguf, tmp_path / "x.gguf", "q4_0", recipe=Recipe(output_type="q9_9"))


@pytest.mark.slow
def test_llama_quantize_reads_the_file_and_makes_the_same_tensors(imx, f32_gguf, tmp_path):
    """llama.cpp's own llama-quantize (built from the sdist of the libllama lorax links), not lorax's reader,
    loads the written file: with it and the same --tensor-type, its q4_k_m tensors equal lorax's in-memory
    recipe byte for byte (its file adds quantize.imatrix.* provenance keys, so whole-file hashes differ)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_gguf import peer_quantize

    exe = peer_quantize()
    if exe is None:
        pytest.skip("llama-quantize could not be built (no sdist, cmake or compiler)")
    matrix = write_imatrix(imx, tmp_path / "imatrix.gguf")
    theirs, ours, plain = tmp_path / "theirs.gguf", tmp_path / "ours.gguf", tmp_path / "plain.gguf"
    run = subprocess.run([str(exe), "--imatrix", str(matrix), "--tensor-type", "ffn_gate=q8_0", str(f32_gguf),
                          str(theirs), "Q4_K_M", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loaded 15 importance matrix entries" in run.stdout + run.stderr
    quantize_gguf(f32_gguf, ours, "q4_k_m", nthread=1,
                  recipe=Recipe(imatrix=imx, tensor_types=(("ffn_gate", "q8_0"),)))
    quantize_gguf(f32_gguf, plain, "q4_k_m", nthread=1)

    def tensors(path: Path) -> dict[str, tuple[int, bytes]]:
        return {t.name: (int(t.tensor_type), t.data.tobytes()) for t in GGUFReader(str(path)).tensors}

    t, o, p = tensors(theirs), tensors(ours), tensors(plain)
    assert t.keys() == o.keys() and len(t) > 20
    assert {n for n in t if t[n] != o[n]} == set()
    assert t["blk.0.ffn_gate.weight"][0] == GGMLQuantizationType.Q8_0
    assert sum(t[n] != p[n] for n in t) >= 10  # the matrix moved the rounding: the test can tell files apart
    assert GGUFReader(str(theirs)).fields["quantize.imatrix.entries_count"].contents() == 15  # in_sum2 + counts pairs


def test_bfloat16_forward_gives_the_matrix_within_bf16_rounding(tiny_model_dir, imx, seqs):
    """Where the CPU has native bf16 the export's forward runs in it (formats/gguf/imatrix.compute_dtype): the
    statistic moves by bf16's rounding (8 mantissa bits, ~0.4% a value, compounded over the layers), not more."""
    bf = collect_imatrix(tiny_model_dir, seqs, token_budget=150, progress=False, dtype="bfloat16")
    a, b = imx.values(), bf.values()
    assert a.keys() == b.keys() and bf.tokens == imx.tokens
    rel = {k: np.abs(a[k] - b[k]) / np.abs(a[k]) for k in a}
    print({k: (float(np.median(r)), float(r.max())) for k, r in rel.items()})
    assert all(np.median(r) < 0.02 and r.max() < 0.1 for r in rel.values())


@pytest.mark.parametrize("tie", [False, True])
def test_a_16_bit_checkpoint_computes_in_float32_bit_for_bit_in_half_the_memory(tiny_model_factory, seqs, tie):
    """Without native bf16 the forward runs in float32 (compute_dtype). A bf16 merge then keeps its linear
    weights in bf16, each upcast for its own forward (formats.hf.load.load_float32_compute): every sum equal
    to a float32 load's, with the weights at 2 bytes a value (1.18B bench merge, 4 x 256 tokens: the same
    155 tensors bit for bit, peak RSS 5.6 -> 3.0 GB, 37 -> 25 s)."""
    from formats.hf.load import load_causal_lm, load_float32_compute

    d = tiny_model_factory(dtype="bfloat16", tie_word_embeddings=tie)
    full = load_causal_lm(d, "float32")
    want = collect_imatrix(d, seqs, token_budget=150, progress=False, model=full).values()
    got = collect_imatrix(d, seqs, token_budget=150, progress=False, dtype="float32").values()
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    lean = load_float32_compute(d)
    linear = [m.weight for m in lean.modules() if isinstance(m, torch.nn.Linear) and m.weight.ndim == 2]
    assert {w.dtype for w in linear} == ({torch.bfloat16, torch.float32} if tie else {torch.bfloat16})
    assert all(p.dtype == torch.float32 for n, p in lean.named_parameters() if "norm" in n or "embed" in n)
    ids = torch.tensor([seqs[0]])
    with torch.inference_mode():
        assert torch.equal(full(ids).logits, lean(ids).logits)  # the head too, tied or not
    # with autograd on, each upcast weight is a tensor of its own (a reused buffer would change under backward)
    norm = [p for n, p in lean.named_parameters() if n.endswith("layers.0.input_layernorm.weight")][0]
    want_norm = [p for n, p in full.named_parameters() if n.endswith("layers.0.input_layernorm.weight")][0]
    full(ids).logits.square().sum().backward()
    lean(ids).logits.square().sum().backward()
    assert torch.equal(norm.grad, want_norm.grad)
    import gc
    import weakref

    layers = [weakref.ref(m) for m in lean.modules() if isinstance(m, torch.nn.Linear)]
    gc.disable()  # freed by reference counting alone, as the export drops it before the next stage
    try:
        del lean, linear
        assert not any(r() is not None for r in layers)  # no layer (and no weight) kept by a cycle
    finally:
        gc.enable()


def test_block_weights_are_what_the_calibration_forward_multiplies(tiny_model_dir, model):
    """Counted from the safetensors headers alone, equal to the loaded model's linear layers inside its blocks."""
    from formats.gguf.imatrix import block_linear_weights

    loaded = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in name)
    assert loaded > 0 and block_linear_weights(tiny_model_dir) == loaded


@pytest.mark.parametrize("weights, tokens", [
    (30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536), 32768),  # SmolLM2-135M: the measured default, kept
    (22 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632), 4096),  # the 1.18B bench model
    (300_000_000, 11_596),
    (8_000_000_000, 4096),
])
def test_auto_budget_holds_the_compute_of_the_measured_default(weights, tokens):
    from formats.gguf.imatrix import auto_token_budget

    assert auto_token_budget(weights) == tokens
    # never more token x weight products than 32,768 tokens through SmolLM2-135M's blocks, unless at the floor
    assert tokens * weights <= 32768 * 106_168_320 or tokens == 4096


def test_imatrix_tokens_option_takes_a_count_or_auto(tmp_path, capsys):
    from exporter.cli.main import main

    for bad in ("0", "lots", "-5"):
        rc = main(["export", str(tmp_path), "--out", str(tmp_path / "d"), "--gguf", "--imatrix-tokens", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "--imatrix-tokens" in err and "auto" in err, err
    assert not (tmp_path / "d").exists()
