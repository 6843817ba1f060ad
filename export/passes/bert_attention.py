"""BERT self-attention → ONNX Runtime's fused ``com.microsoft.Attention`` (the ``ort-fused`` graph).

Why: the dynamo export spells every layer's attention out as three projections, head
reshapes/transposes, a ``[B, 1, S, S]`` mask built from ``attention_mask`` with GatherND/Where, a
softmax with a NaN guard and two batched MatMuls. ONNX Runtime's own session optimiser fuses the
LayerNorms (SkipLayerNormalization) and GELU (BiasGelu) of that graph, but not the attention, and
``onnxruntime.transformers.optimizer`` does not recognise the dynamo pattern either (measured: it
fuses BiasGelu only; no Attention, no EmbedLayerNormalization). This pass replaces each layer's
attention with one ``Attention`` node: one packed QKV GEMM, the key-padding mask applied inside
the kernel from the ``[B, S]`` mask (no ``[B, 1, S, S]`` tensor), and no layout copies.

Matched per ``Softmax``: ``Softmax(Add(MatMul(q·s, kᵀ·s), mask)) → MatMul(·, v)``, where q, k and v
each trace back through Reshape/Transpose/scalar-Mul to ``Add(MatMul(x, W), b)`` on the same ``x``;
the attention output is the ``Reshape`` back to ``[B, S, hidden]``. Anything else is left alone,
and a graph with no match raises :class:`PassError` (the variant would be a lie).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.passes.onnx_proto import (
    MS_DOMAIN,
    Names,
    PassError,
    constant_value,
    import_ms_domain,
    make_node,
    producers,
    remove_dead_nodes,
    replace_nodes,
)

MASK_INPUT = "attention_mask"


@dataclass(frozen=True)
class _Projection:
    x: str
    weight: str
    bias: str
    scale: float
    product: str  # the MatMul's output, before the bias


@dataclass(frozen=True)
class _Match:
    q: _Projection
    k: _Projection
    v: _Projection
    reshape: onnx.NodeProto  # its output is the attention's [B, S, hidden] result


def _projection(graph: onnx.GraphProto, name: str, prod: dict[str, onnx.NodeProto]) -> _Projection | None:
    """Follow Reshape/Transpose/scalar-Mul back to ``Add(MatMul(x, W), b)`` with constant W, b."""
    inits = {i.name for i in graph.initializer}
    scale = 1.0
    for _ in range(12):
        node = prod.get(name)
        if node is None:
            return None
        if node.op_type in ("Reshape", "Transpose"):
            name = node.input[0]
        elif node.op_type == "Mul":
            value = constant_value(graph, node.input[1])
            if value is None or value.size != 1:
                return None
            scale *= float(value.reshape(-1)[0])
            name = node.input[0]
        elif node.op_type == "Add":
            matmul = prod.get(node.input[0])
            if matmul is None or matmul.op_type != "MatMul" or node.input[1] not in inits:
                return None
            if matmul.input[1] not in inits:
                return None
            return _Projection(matmul.input[0], matmul.input[1], node.input[1], scale, matmul.output[0])
        else:
            return None
    return None


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            table.setdefault(name, []).append(node)
    return table


def _probs_matmul(softmax: onnx.NodeProto, cons: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto | None:
    """The ``MatMul(probs, v)`` after the softmax, through the exporter's optional NaN guard."""
    name = softmax.output[0]
    for _ in range(3):
        users = cons.get(name, [])
        matmuls = [u for u in users if u.op_type == "MatMul" and u.input[0] == name]
        if matmuls:
            return matmuls[0]
        wheres = [u for u in users if u.op_type == "Where"]
        if not wheres:
            return None
        name = wheres[0].output[0]
    return None


def _output_reshape(matmul: onnx.NodeProto, cons: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto | None:
    """Transpose([0, 2, 1, 3]) → Reshape: the heads merged back into ``[B, S, hidden]``."""
    users = cons.get(matmul.output[0], [])
    if len(users) != 1 or users[0].op_type != "Transpose":
        return None
    perm = [list(a.ints) for a in users[0].attribute if a.name == "perm"]
    if perm != [[0, 2, 1, 3]]:
        return None
    after = cons.get(users[0].output[0], [])
    return after[0] if len(after) == 1 and after[0].op_type == "Reshape" else None


def _weight(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise PassError(f"initializer {name!r} not found")


def _matches(graph: onnx.GraphProto) -> list[_Match]:
    """Every self-attention of the dynamo pattern (module docstring), in graph order."""
    prod, cons = producers(graph), _consumers(graph)
    found = []
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        add = prod.get(softmax.input[0])
        if add is None or add.op_type != "Add":
            continue
        scores = next((prod[i] for i in add.input if i in prod and prod[i].op_type == "MatMul"), None)
        probs = _probs_matmul(softmax, cons)
        if scores is None or probs is None:
            continue
        q, k = (_projection(graph, i, prod) for i in scores.input)
        v = _projection(graph, probs.input[1], prod)
        reshape = _output_reshape(probs, cons)
        if q is None or k is None or v is None or reshape is None or len({q.x, k.x, v.x}) != 1:
            continue
        found.append(_Match(q, k, v, reshape))
    return found


def _fuse(
    model: onnx.ModelProto,
    num_heads: int,
    prefix: str,
    build: Callable[[_Match, Names, str], tuple[list[str], str]],
) -> int:
    """Replace every matched self-attention's output ``Reshape`` by one contrib op; returns how many.

    ``build(match, names, mask)`` adds what the op needs (initializers) and returns its inputs and
    op type. Keyed by output name: protobuf wrappers are recreated per iteration, so ``id`` is no key.
    """
    graph = model.graph
    names = Names(graph, prefix)
    mask = names("mask_int32")
    replacements: dict[str, onnx.NodeProto] = {}  # by the replaced Reshape's output
    for m in _matches(graph):
        inputs, op_type = build(m, names, mask)
        replacements[m.reshape.output[0]] = helper.make_node(
            op_type,
            inputs,
            [m.reshape.output[0]],
            name=names(op_type),
            domain=MS_DOMAIN,
            num_heads=num_heads,
            scale=m.q.scale * m.k.scale,
        )
    if not replacements:
        raise PassError("no BERT self-attention pattern found to fuse")
    cast = make_node("Cast", [MASK_INPUT], [mask], names("Cast"), to=onnx.TensorProto.INT32)
    replace_nodes(graph, [cast, *(replacements.get(n.output[0], n) for n in graph.node)])
    remove_dead_nodes(graph)
    import_ms_domain(model)
    return len(replacements)


def fuse_bert_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Replace every matched self-attention with ``com.microsoft.Attention``; returns how many.

    Needs the weights in memory (the Q/K/V matrices are packed into one); BERT-sized models only.
    """
    graph = model.graph

    def packed(m: _Match, names: Names, mask: str) -> tuple[list[str], str]:
        packed_w, packed_b = names("qkv_weight"), names("qkv_bias")
        weights = np.concatenate([_weight(graph, p.weight) for p in (m.q, m.k, m.v)], axis=1)
        biases = np.concatenate([_weight(graph, p.bias) for p in (m.q, m.k, m.v)])
        graph.initializer.extend(
            [numpy_helper.from_array(weights, packed_w), numpy_helper.from_array(biases, packed_b)]
        )
        return [m.q.x, packed_w, packed_b, mask], "Attention"

    return _fuse(model, num_heads, "ort_attention", packed)


def fuse_bert_attention_core(model: onnx.ModelProto, num_heads: int) -> int:
    """Replace every matched attention *core* with ``com.microsoft.MultiHeadAttention``, keeping the
    Q/K/V projections as plain ``MatMul`` nodes (their biases move into the op); returns how many.

    Why besides :func:`fuse_bert_attention`: ``Attention`` takes the packed Q/K/V weight as an
    input, so no int8 quantiser can rewrite those projections; here they stay quantisable MatMuls
    while the core (scores, key-padding mask from the ``[B, S]`` mask, softmax, head merge) is one
    fused kernel. Weights are read only for the (small) biases.
    """
    graph = model.graph

    def core(m: _Match, names: Names, mask: str) -> tuple[list[str], str]:
        bias = names("qkv_bias")
        graph.initializer.append(
            numpy_helper.from_array(np.concatenate([_weight(graph, p.bias) for p in (m.q, m.k, m.v)]), bias)
        )
        return [m.q.product, m.k.product, m.v.product, bias, mask], "MultiHeadAttention"

    return _fuse(model, num_heads, "ort_mha", core)
