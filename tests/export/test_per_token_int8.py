"""The per-token int8 rewrite (export/per_token_int8.py) on a small synthetic graph: it computes the
documented formula (smoothing, one symmetric scale per row, round half to even, per-column weight
scales), a row's result never depends on the other rows, and it is spelled with the cheap ops
(no Abs/Div/Round/Cast passes, the row scale inside the GEMM call) without raising the opset."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.passes.onnx_proto import PassError
from export.per_token_int8 import quantize_per_token, smoothing_factors

K, N1, N2 = 48, 40, 24


def _model(opset: int = 20) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``a = x·W1``, ``b = x·W2`` (one shared input, like q/k/v) and ``c = a·W3``; x has outlier channels."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((K, N1)).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((K, N2)).astype(np.float32) * 0.1,
        "w3": rng.standard_normal((N1, N2)).astype(np.float32) * 0.1,
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
            helper.make_node("MatMul", ["x", "w2"], ["b"], name="mm2"),
            helper.make_node("MatMul", ["a", "w3"], ["c"], name="mm3"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", "S", N2]) for o in ("b", "c")],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), weights


def _inputs(batch: int, seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, K)).astype(np.float32)
    x[..., 3] *= 40.0  # an outlier channel, as in BERT's hidden states
    return x


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in sess.run(["b", "c"], {"x": x})]


def _reference(x: np.ndarray, w: np.ndarray, factors: np.ndarray | None) -> np.ndarray:
    """The formula of the module docstring in numpy (what the first, op-by-op version computed)."""
    if factors is not None:
        x = x * (1.0 / factors).astype(np.float32)
        w = w * factors[:, None]
    scale = (np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-12)) * np.float32(1 / 127.0)).astype(
        np.float32
    )
    xq = np.round(x / scale).astype(np.int32)  # numpy rounds half to even, like QuantizeLinear
    w_scale = (np.maximum(np.abs(w).max(0), 1e-12) / 127.0).astype(np.float32)
    wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int32)
    return ((xq @ wq).astype(np.float32) * w_scale) * scale


@pytest.mark.parametrize("smooth", [False, True])
def test_matches_the_formula(smooth: bool) -> None:
    model, w = _model()
    x = _inputs(3, 7, seed=1)
    amax = {"x": np.abs(x).reshape(-1, K).max(0), "a": None} if smooth else None
    channel_max = {k: v for k, v in (amax or {}).items() if v is not None}
    assert quantize_per_token(model, channel_max=channel_max) == 3
    b, c = _run(model, x)
    factors = smoothing_factors(channel_max["x"], [w["w1"], w["w2"]]) if smooth else None
    want_b = _reference(x, w["w2"], factors)
    assert np.abs(b - want_b).max() <= 1e-5 * np.abs(want_b).max()
    a = _reference(x, w["w1"], factors)  # c quantises a's rows again (no smoothing for a)
    want_c = _reference(a, w["w3"], None)
    assert np.abs(c - want_c).max() <= 1e-4 * np.abs(want_c).max()
    fp32 = x @ w["w2"]
    cos = (b * fp32).sum(-1) / (np.linalg.norm(b, axis=-1) * np.linalg.norm(fp32, axis=-1))
    assert cos.min() > 0.99


def test_a_row_never_depends_on_its_neighbours() -> None:
    """Bit-identical rows whether a sequence runs alone or beside others (padding rows included)."""
    model, _ = _model()
    quantize_per_token(model)
    x = _inputs(4, 9, seed=2)
    x[1, 5:] = 0.0  # a right-padded row
    x[2] *= 1e3  # a loud neighbour
    batched = _run(model, x)
    for r in range(len(x)):
        alone = _run(model, x[r : r + 1])
        for got, want in zip(batched, alone, strict=True):
            assert np.array_equal(got[r : r + 1], want)
    shorter = _run(model, x[1:2, :5])  # the padded row without its padding
    assert np.array_equal(batched[0][1, :5], shorter[0][0])


def test_spelled_with_cheap_ops_and_keeps_the_opset() -> None:
    model, _ = _model()
    quantize_per_token(model, channel_max={"x": np.ones(K, np.float32)})
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulIntegerToFloat"] == 3 and ops["MatMul"] == 0
    assert ops["QuantizeLinear"] == 2  # one per distinct input: x (shared by two MatMuls) and a
    assert ops["Mul"] == 2 + 1  # the two row-scale computations + x's smoothing; no Mul after a GEMM
    for slow in ("Abs", "Div", "Round", "Cast", "Add"):
        assert ops[slow] == 0, slow
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"):
        assert node.input[2] not in inits  # A's scale is the runtime per-row scale, not a constant
        assert producers[node.input[2]].op_type == "Mul"
        view = producers[node.input[0]]  # the uint8 rows, reshaped back to x's shape
        assert view.op_type == "Reshape" and producers[view.input[0]].op_type == "QuantizeLinear"
    assert [o.version for o in model.opset_import if o.domain == ""] == [20]
    onnx.checker.check_model(model)


def test_refuses_an_opset_without_reduce_axes_inputs() -> None:
    model, _ = _model(opset=17)
    with pytest.raises(PassError, match="opset 18"):
        quantize_per_token(model)
