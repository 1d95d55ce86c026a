"""formats/onnx/blockquant.py against onnxruntime itself: the packed bytes mean what the search chose, and the
search loses less than onnxruntime's own round-to-nearest on a QLoRA-merge-like weight.

The runtime is the judge of the layout: a one-node graph of MatMulNBits (or GatherBlockQuantized) is run on
the identity matrix (or every row index), which returns the weight exactly as the runtime decodes it.
"""

from __future__ import annotations

import numpy as np
import pytest

from formats.onnx.blockquant import dequantize, pack_gather, pack_matmul_nbits, quantize_rows

N, K = 48, 128


def _run(node, inputs: dict, inits) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, list(v.shape))
                                           for n, (v, t) in inputs.items()],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: v for n, (v, _) in inputs.items()})[0]


def _packed(arrays: tuple, symmetric: bool) -> tuple[list, list[str]]:
    """Initializers (data, scales[, zero points]) of a block-quantized op, and their names in that order."""
    from onnx import numpy_helper

    data, scales, zp = arrays
    inits = [numpy_helper.from_array(data, "D"), numpy_helper.from_array(scales, "S")]
    if not symmetric:
        inits.append(numpy_helper.from_array(zp, "Z"))
    return inits, [i.name for i in inits]


def runtime_matmul_weight(w_blocks, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """[N, K] as onnxruntime's MatMulNBits computes with it (identity input, float accuracy level)."""
    from onnx import TensorProto, helper

    n, k = w_blocks.shape
    inits, (data, *rest) = _packed(pack_matmul_nbits(w_blocks), symmetric)
    node = helper.make_node("MatMulNBits", ["A", data, *rest], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    return _run(node, {"A": (np.eye(k, dtype=np.float32), TensorProto.FLOAT)}, inits).T


def runtime_gather_weight(w_blocks, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """[N, K] as onnxruntime's GatherBlockQuantized returns it (every row index)."""
    from onnx import TensorProto, helper

    n, _ = w_blocks.shape
    inits, (data, *rest) = _packed(pack_gather(w_blocks), symmetric)
    node = helper.make_node("GatherBlockQuantized", [data, "I", *rest], ["Y"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=1, block_size=block, bits=bits)
    return _run(node, {"I": (np.arange(n, dtype=np.int64), TensorProto.INT64)}, inits)


def qlora_like(seed: int = 0) -> np.ndarray:
    """NF4 levels times a per-64 absmax plus a rank-4 delta: the shape of a QLoRA merge's weights."""
    rng = np.random.default_rng(seed)
    nf4 = np.array([-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461,
                    0.3379, 0.4407, 0.5626, 0.7230, 1], dtype=np.float32)
    absmax = rng.uniform(0.02, 0.08, (N, K // 64, 1)).astype(np.float32)
    base = (nf4[rng.integers(0, 16, (N, K // 64, 64))] * absmax).reshape(N, K)
    delta = rng.normal(0, 0.004, (N, 4)) @ rng.normal(0, 1, (4, K))
    return (base + delta).astype(np.float32)


@pytest.mark.parametrize("bits,block,symmetric", [(4, 16, False), (4, 32, False), (4, 32, True), (8, 32, True),
                                                  (8, 16, False)])
def test_runtime_decodes_what_was_chosen(bits, block, symmetric):
    w = qlora_like()
    q = quantize_rows(w, bits, block, None, symmetric)
    mine = dequantize(q).numpy()
    assert np.abs(runtime_matmul_weight(q, bits, block, symmetric) - mine).max() <= 1e-6 * np.abs(mine).max()
    assert np.abs(runtime_gather_weight(q, bits, block, symmetric) - mine).max() <= 1e-6 * np.abs(mine).max()
    # and what was chosen is close to the weight: at most half a grid step per element
    step = q.scales.abs().numpy().repeat(block, axis=1)
    assert (np.abs(mine - w) <= 0.5 * step * 1.0001 + 1e-7).mean() > 0.99


def _ort_rtn_weight(w: np.ndarray, block: int) -> np.ndarray:
    """onnxruntime's own MatMulNBits quantizer (round-to-nearest, asymmetric) on the same weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    node = helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [K, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=False, accuracy_level=0, bits=4))
    quantizer.process()
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx.ModelProto.SerializeToString(quantizer.model.model),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": np.eye(K, dtype=np.float32)})[0].T


def test_search_loses_less_than_onnxruntime_rtn():
    """The layer's output error on inputs whose columns run at uneven scales (as LLM activations do), block 32,
    asymmetric, with the inputs' mean x² as the importance: measured 0.59x of onnxruntime's round-to-nearest
    (0.96x without the importance; 0.91x by plain weight MSE, which the search does not minimise)."""
    rng = np.random.default_rng(2)
    w = qlora_like()
    x = rng.normal(0, 1, (512, K)).astype(np.float32) * np.exp(rng.normal(0, 1, K)).astype(np.float32)
    ours = runtime_matmul_weight(quantize_rows(w, 4, 32, importance=(x * x).mean(0)), 4, 32, symmetric=False)
    theirs = _ort_rtn_weight(w, 32)
    ratio = float(((x @ (ours - w).T) ** 2).mean() / ((x @ (theirs - w).T) ** 2).mean())
    assert ratio < 0.7, ratio


def test_importance_moves_the_error_off_the_columns_that_matter():
    """Columns that run 100x larger on calibration text get a smaller share of the rounding error."""
    w = qlora_like(1)
    imp = np.ones(K, dtype=np.float32)
    hot = np.arange(0, K, 8)
    imp[hot] = 100.0
    plain = dequantize(quantize_rows(w, 4, 32)).numpy()
    weighted = dequantize(quantize_rows(w, 4, 32, importance=imp)).numpy()

    def out_err(x):  # the error the layer's output sees on such inputs: sum over columns of imp * err²
        return float((((x - w) ** 2) * imp).sum())

    assert ((weighted - w)[:, hot] ** 2).mean() < 0.8 * ((plain - w)[:, hot] ** 2).mean()
    assert out_err(weighted) < 0.9 * out_err(plain)


def test_shape_and_degenerate_blocks():
    w = np.zeros((4, 32), np.float32)
    w[1, :16] = 1.0  # one all-zero block, one constant block, one mixed
    q = quantize_rows(w, 4, 16)
    assert np.isfinite(q.scales.numpy()).all()
    np.testing.assert_allclose(dequantize(q).numpy(), w, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_rows(np.zeros((2, 40), np.float32), 4, 32)
