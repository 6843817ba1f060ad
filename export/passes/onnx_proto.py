"""Small, typed helpers over ``onnx.GraphProto`` shared by the passes.

Why hand-rolled on the protobuf rather than onnx-ir/onnxscript rewriters: each pass here is a
handful of node substitutions, and the protobuf keeps the graph byte-for-byte what the exporter
wrote everywhere the pass does not touch (names, value_info, external-data references), which
makes the parity checks meaningful and the diffs easy to read.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


class PassError(ValueError):
    """A pass met a graph it does not understand; the message names the node or pattern."""


class Names:
    """Hands out value/node names that do not collide with any name already in the graph."""

    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        self._used = set(all_value_names(graph))
        self._used.update(n.name for n in graph.node)
        self._prefix = prefix
        self._counter = itertools.count()

    def __call__(self, hint: str) -> str:
        while True:
            name = f"{self._prefix}/{hint}_{next(self._counter)}"
            if name not in self._used:
                self._used.add(name)
                return name


def all_value_names(graph: onnx.GraphProto) -> Iterable[str]:
    yield from (i.name for i in graph.input)
    yield from (i.name for i in graph.initializer)
    yield from (o.name for o in graph.output)
    for node in graph.node:
        yield from node.input
        yield from node.output


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Value name → the top-level node that produces it."""
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name → top-level nodes reading it (subgraph reads count as reads of their Loop/If)."""
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) | subgraph_outer_reads(node):
            if name:
                table.setdefault(name, []).append(node)
    return table


def subgraph_outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (Loop/If/Scan bodies) read from the enclosing scope."""
    reads: set[str] = set()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            reads |= _graph_free_names(attr.g)
    return reads


def _graph_free_names(graph: onnx.GraphProto) -> set[str]:
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    free: set[str] = set()
    for node in graph.node:
        for name in [*node.input, *subgraph_outer_reads(node)]:
            if name and name not in local:
                free.add(name)
        local.update(node.output)
    return free


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` node output, else None."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers(graph).get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def constant_rank(graph: onnx.GraphProto, name: str) -> int | None:
    """Rank of an initializer or Constant output without loading its (maybe external) data."""
    for init in graph.initializer:
        if init.name == name:
            return len(init.dims)
    node = producers(graph).get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return len(attr.t.dims)
    return None


def is_constant(graph: onnx.GraphProto, name: str, inits: set[str] | None = None) -> bool:
    names = inits if inits is not None else {i.name for i in graph.initializer}
    if name in names:
        return True
    node = producers(graph).get(name)
    return node is not None and node.op_type == "Constant"


def add_int64(graph: onnx.GraphProto, names: Names, hint: str, values: Sequence[int]) -> str:
    """Add a 1-D int64 initializer and return its name."""
    name = names(hint)
    graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def add_scalar_int64(graph: onnx.GraphProto, names: Names, hint: str, value: int) -> str:
    name = names(hint)
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
    return name


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes (and unused initializers) that no graph output depends on; returns nodes dropped.

    Why: after a pass reroutes a consumer, the old chain (e.g. the exporter's [B,1,S,S] mask)
    must disappear, or ORT would still compute it and the memory bound would be a lie.
    """
    prod = producers(graph)
    needed: set[str] = set()
    live: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = prod.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
            stack.extend(subgraph_outer_reads(node))
    keep = [n for n in graph.node if any(out in needed for out in n.output)]
    dropped = len(graph.node) - len(keep)
    replace_nodes(graph, keep)
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)
    live_values = needed | {o for n in keep for o in n.output}
    stale = [vi for vi in graph.value_info if vi.name not in live_values]
    for vi in stale:
        graph.value_info.remove(vi)
    return dropped


def op_counts(model: onnx.ModelProto, include_subgraphs: bool = True) -> Counter[str]:
    """Histogram of op types, optionally including Loop/If bodies (for fusion reports and tests)."""
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            if include_subgraphs:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        walk(attr.g)

    walk(model.graph)
    return counts


def value_elem_type(graph: onnx.GraphProto, name: str, default: int = onnx.TensorProto.FLOAT) -> int:
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        if vi.name == name and vi.type.HasField("tensor_type"):
            return int(vi.type.tensor_type.elem_type)
    return default


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(imp.version)
    raise PassError(f"model imports no opset for domain {domain!r}")


MS_DOMAIN = "com.microsoft"


def import_ms_domain(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's contrib-op domain (Attention, MultiHeadAttention, MatMulIntegerToFloat…)."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def topo_sort(graph: onnx.GraphProto) -> None:
    """Re-order nodes topologically in place (passes append nodes wherever convenient)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest: list[onnx.NodeProto] = []
        for node in pending:
            if all(i in available for i in [*node.input, *subgraph_outer_reads(node)]):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise PassError(f"graph has a cycle or undefined inputs: {missing}")
        pending = rest
    replace_nodes(graph, ordered)


def replace_nodes(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> None:
    """Set ``graph.node`` to ``nodes``. Copies first: protobuf wrappers of removed repeated
    elements must not be relied on after the field is cleared."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def find_node(graph: onnx.GraphProto, output: str) -> onnx.NodeProto:
    """The live top-level node producing ``output`` (node references go stale across rewrites)."""
    for node in graph.node:
        if output in node.output:
            return node
    raise PassError(f"no node produces {output!r}")


def make_node(
    op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any
) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=name, **attrs)
