"""The ``per-token`` int8 graph rewrite behind :func:`export.quantize.quantize` (call that, not this).

Per-token (per-row) int8 activations are batch-invariant inside a padded batch, by construction.

Why: ``quantize_dynamic`` takes one activation scale over the whole ``[B, S, K]`` tensor, so
padding and neighbours move every text's vector. A scale per row (token) depends only on that
token's activations, so the same text gives the same vector alone or batched, on either padding
side. Weights are symmetric int8 per output channel; activations are shifted to uint8 with zero
point 128 because ORT's u8×s8 QGEMM is ~10× faster than s8×s8.

Per MatMul with a constant 2-D weight ``W [K, N]``:
``s = max(ReduceMax(|x|, -1), ε) / 127``; ``xq = Cast(Round(x / s) + 128, uint8)``;
``y = MatMulIntegerToFloat(xq, Wq, 1, w_scale, 128, 0) · s`` (com.microsoft, fuses the
int32→float conversion and the weight scales; the row scale is one more Mul).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.passes.onnx_proto import Names, PassError, make_node, subgraph_outer_reads

_EPS = 1e-12


def _quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: (Wq int8 [K, N], scale float32 [N])."""
    scale = np.maximum(np.abs(weight).max(axis=0), _EPS) / 127.0
    q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_per_token(model: onnx.ModelProto, nodes: set[str] | None = None) -> int:
    """Rewrite top-level MatMuls with a constant 2-D fp32 weight (only those named in ``nodes``,
    when given); returns how many changed.

    Loads weights into memory (the int8 copies replace them), so it is meant for models that fit
    in RAM, like ORT's own quantisers.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    names = Names(graph, "per_token_int8")
    eps = names("eps")
    graph.initializer.append(numpy_helper.from_array(np.asarray(_EPS, np.float32), eps))
    inv127 = names("inv127")
    graph.initializer.append(numpy_helper.from_array(np.asarray(1 / 127.0, np.float32), inv127))
    zp_u8, zp_s8, one = names("zp_u8"), names("zp_s8"), names("one")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(128, np.uint8), zp_u8),
            numpy_helper.from_array(np.asarray(0, np.int8), zp_s8),
            numpy_helper.from_array(np.asarray(1.0, np.float32), one),
        ]
    )
    shift = names("shift")
    graph.initializer.append(numpy_helper.from_array(np.asarray(128.0, np.float32), shift))
    axes = names("axes")
    graph.initializer.append(numpy_helper.from_array(np.asarray([-1], np.int64), axes))
    new_nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        wanted = nodes is None or node.name in nodes
        if (
            not wanted
            or weight is None
            or len(weight.dims) != 2
            or weight.data_type != onnx.TensorProto.FLOAT
        ):
            new_nodes.append(node)
            continue
        wq, wscale = _quantize_weight(numpy_helper.to_array(weight))
        wq_name, ws_name = names("wq"), names("wscale")
        graph.initializer.extend(
            [numpy_helper.from_array(wq, wq_name), numpy_helper.from_array(wscale, ws_name)]
        )
        x = node.input[0]
        v = {k: names(k) for k in ("abs", "max", "clamped", "scale", "scaled", "round", "shifted", "xq", "y")}
        new_nodes += [
            make_node("Abs", [x], [v["abs"]], names("Abs")),
            make_node("ReduceMax", [v["abs"], axes], [v["max"]], names("ReduceMax"), keepdims=1),
            make_node("Max", [v["max"], eps], [v["clamped"]], names("Max")),
            make_node("Mul", [v["clamped"], inv127], [v["scale"]], names("Mul")),
            make_node("Div", [x, v["scale"]], [v["scaled"]], names("Div")),
            make_node("Round", [v["scaled"]], [v["round"]], names("Round")),
            make_node("Add", [v["round"], shift], [v["shifted"]], names("Add")),
            make_node("Cast", [v["shifted"]], [v["xq"]], names("Cast"), to=onnx.TensorProto.UINT8),
            helper.make_node(
                "MatMulIntegerToFloat",
                [v["xq"], wq_name, one, ws_name, zp_u8, zp_s8],
                [v["y"]],
                name=names("MatMulIntegerToFloat"),
                domain="com.microsoft",
            ),
            make_node("Mul", [v["y"], v["scale"]], list(node.output), names("Mul")),
        ]
        changed += 1
    if not changed:
        raise PassError("no MatMul with a constant 2-D float weight to quantise")
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {
        i for n in graph.node for i in [*n.input, *subgraph_outer_reads(n)]
    }  # Loop bodies read weights too
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return changed
