"""Grouped-query attention without a materialised ``repeat_kv``.

Why: with a padding mask, transformers' SDPA path repeats every K/V head ``num_heads /
num_kv_heads`` times (Unsqueeze → Expand → Reshape) before ``scaled_dot_product_attention``, so
the opset-23 export feeds ``Attention`` K/V tensors 7× larger than needed for the 7B (28/4
heads). The ONNX ``Attention`` op (opset 23) takes K/V with fewer heads than Q and groups them
itself; ONNX Runtime's CPU kernel implements that (checked to 1.8e-7 against an explicit
repeat). This pass reconnects ``Attention`` to the un-repeated K/V and drops the copies.
"""

from __future__ import annotations

import onnx

from export.passes.onnx_proto import constant_value, producers, remove_dead_nodes


def _unrepeated(graph: onnx.GraphProto, name: str, prod: dict[str, onnx.NodeProto]) -> str | None:
    """If ``name`` is Reshape(Expand(Unsqueeze(x, axes=[2]))), return x; else None."""
    reshape = prod.get(name)
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = prod.get(reshape.input[0])
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = prod.get(expand.input[0])
    if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.input) < 2:
        return None
    axes = constant_value(graph, unsq.input[1])
    if axes is None or [int(a) for a in axes.reshape(-1)] != [2]:
        return None
    return str(unsq.input[0])


def drop_repeat_kv(model: onnx.ModelProto) -> int:
    """Feed each ``Attention`` the grouped K/V directly; returns how many Attention nodes changed.

    Exact: the op's own grouping reads the same K/V values the repeat would have copied.
    """
    graph = model.graph
    prod = producers(graph)
    changed = 0
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        k = _unrepeated(graph, node.input[1], prod)
        v = _unrepeated(graph, node.input[2], prod)
        if k is None or v is None:
            continue
        node.input[1] = k
        node.input[2] = v
        changed += 1
    if changed:
        remove_dead_nodes(graph)
    return changed
