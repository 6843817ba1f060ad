"""Sequence-chunked MLP: bound the ``[B, S, intermediate]`` activations at long inputs.

Why: for the 7B at 32k tokens each MLP intermediate (gate, up, their product) is
32768 × 18944 × 4 B ≈ 2.5 GB in fp32, larger than everything attention needs once it is
query-chunked. The MLP is token-wise, so running it over blocks of C tokens and concatenating is
the same computation (each output row is the same dot products), while only
``[B, C, intermediate]`` is alive at a time.

The pass finds each MLP as the region "owned" by a normalised hidden state: the nodes computed
only from that value and constants, ending in one value used outside the region, with ≥ 3
constant-weight MatMuls (gate, up, down) and only token-wise ops.
"""

from __future__ import annotations

import onnx

from export.passes._loop import plan_chunks, sequence_length, wrap_in_loop
from export.passes.onnx_proto import (
    Names,
    PassError,
    find_node,
    remove_dead_nodes,
    topo_sort,
    value_elem_type,
)

# Ops that act on each token (row) independently when their other operands are constants of
# rank ≤ 1 (biases, scalars) or values from the same region.
_ROWWISE = {
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sigmoid",
    "Tanh",
    "Relu",
    "Gelu",
    "Erf",
    "Softplus",
    "Cast",
    "QuickGelu",
    "FastGelu",
}
_NORMS = {"RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization"}
MASK_INPUT = "attention_mask"


def _region(graph: onnx.GraphProto, start: int, root: str, inits: set[str]) -> list[onnx.NodeProto] | None:
    """Nodes after index ``start`` computed only from ``root`` and constants; None if not an MLP."""
    ranks = {i.name: len(i.dims) for i in graph.initializer}
    inside = {root}
    region: list[onnx.NodeProto] = []
    for node in list(graph.node)[start + 1 :]:
        data = [i for i in node.input if i and i not in inits]
        if data and all(i in inside for i in data):
            if node.op_type not in _ROWWISE:
                return None
            for name in node.input:
                if name in inits:
                    rank = ranks.get(name)
                    if rank is None or (node.op_type != "MatMul" and rank > 1):
                        return None
                    if node.op_type == "MatMul" and (rank != 2 or name != node.input[1]):
                        return None
            region.append(node)
            inside.update(node.output)
    if sum(n.op_type == "MatMul" for n in region) < 3:
        return None
    return region


def _escaping(graph: onnx.GraphProto, region: list[onnx.NodeProto]) -> list[str]:
    produced = {o for n in region for o in n.output}
    ids = {n.output[0] for n in region}
    used_outside = {i for n in graph.node if n.output[0] not in ids for i in n.input}
    used_outside |= {o.name for o in graph.output}
    return sorted(produced & used_outside)


def chunk_mlp(model: onnx.ModelProto, chunk: int = 2048) -> int:
    """Wrap each MLP (norm output → down projection) in a Loop over blocks of ``chunk`` tokens.

    Returns the number of MLPs rewritten; raises ``PassError`` if none is found.
    """
    graph = model.graph
    if MASK_INPUT not in {i.name for i in graph.input}:
        raise PassError(f"graph has no {MASK_INPUT!r} input")
    topo_sort(graph)
    inits = {i.name for i in graph.initializer}
    found: list[tuple[str, list[str], str]] = []  # (root, region node first-outputs, escaping output)
    for index, node in enumerate(graph.node):
        if node.op_type not in _NORMS:
            continue
        region = _region(graph, index, node.output[0], inits)
        if region is None:
            continue
        escaping = _escaping(graph, region)
        if len(escaping) != 1 or escaping[0] not in region[-1].output:
            continue
        found.append((node.output[0], [n.output[0] for n in region], escaping[0]))
    if not found:
        raise PassError("no token-wise MLP region found after a normalisation node")
    names = Names(graph, "chunked_mlp")
    plan = plan_chunks(graph, names, sequence_length(graph, names, MASK_INPUT), chunk)
    for root, region_outputs, out in found:
        nodes = [find_node(graph, o) for o in region_outputs]
        wrap_in_loop(
            graph,
            names,
            nodes,
            sliced=root,
            axis=1,
            rank=3,
            output=out,
            output_elem_type=value_elem_type(graph, out, value_elem_type(graph, root)),
            plan=plan,
        )
    remove_dead_nodes(graph)
    topo_sort(graph)
    return len(found)
