"""Run a row-wise piece of a graph over blocks of one axis with an ONNX ``Loop``.

Why a Loop and not a fixed split: the sequence length is dynamic, and a Loop body is compiled
once and executed ``ceil(S / C)`` times, so peak memory is that of one block (C rows) while the
graph stays one file for every length. The input is padded to a multiple of the block size so
every iteration sees the same shapes; the padded rows are sliced off at the end. For rows that
do not interact (attention queries given all keys, MLP tokens) the result equals the unblocked
computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import onnx
from onnx import helper

from export.passes.onnx_proto import Names, add_int64, make_node, replace_nodes


class ChunkPlan(NamedTuple):
    """Names of the values that describe one blocking of the sequence axis."""

    length: str  # 1-D [S]
    size: str  # 1-D [Cb], Cb = min(S, C)
    trips: str  # scalar M = ceil(S / Cb)
    pad: str  # 1-D [M·Cb − S]


def sequence_length(graph: onnx.GraphProto, names: Names, attention_mask: str) -> str:
    """1-D [S] from the ``[batch, seq]`` mask, added once per pass."""
    shape = names("mask_shape")
    seq = names("seq_len")
    graph.node.append(make_node("Shape", [attention_mask], [shape], names("Shape")))
    graph.node.append(
        make_node(
            "Slice",
            [shape, add_int64(graph, names, "one", [1]), add_int64(graph, names, "two", [2])],
            [seq],
            names("Slice"),
        )
    )
    return seq


def plan_chunks(graph: onnx.GraphProto, names: Names, length: str, chunk: int) -> ChunkPlan:
    """Add the nodes computing Cb, M and the padding for blocks of ``chunk`` rows."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    size, trips_1d, trips, padded, pad, tmp = (names(h) for h in ("cb", "m1", "m", "padded", "pad", "tmp"))
    one = add_int64(graph, names, "one", [1])
    graph.node.extend(
        [
            make_node("Min", [length, add_int64(graph, names, "chunk", [chunk])], [size], names("Min")),
            # M = (S + Cb - 1) // Cb
            make_node("Add", [length, size], [tmp + "a"], names("Add")),
            make_node("Sub", [tmp + "a", one], [tmp + "b"], names("Sub")),
            make_node("Div", [tmp + "b", size], [trips_1d], names("Div")),
            make_node("Squeeze", [trips_1d], [trips], names("Squeeze")),
            make_node("Mul", [trips_1d, size], [padded], names("Mul")),
            make_node("Sub", [padded, length], [pad], names("Sub")),
        ]
    )
    return ChunkPlan(length=length, size=size, trips=trips, pad=pad)


def wrap_in_loop(
    graph: onnx.GraphProto,
    names: Names,
    nodes: Sequence[onnx.NodeProto],
    sliced: str,
    axis: int,
    rank: int,
    output: str,
    output_elem_type: int,
    plan: ChunkPlan,
) -> onnx.NodeProto:
    """Move ``nodes`` (topologically ordered, computing ``output`` from ``sliced`` and outer values)
    into a Loop over blocks of ``sliced`` along ``axis``; ``output`` keeps its name and shape.

    Precondition (the caller checks it): every row of ``output`` along ``axis`` depends only on
    the same row of ``sliced``. ``rank`` is the rank of both ``sliced`` and ``output``.
    """
    if not 0 <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    moved_nodes = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        moved_nodes.append(copy)
    moving = {n.output[0] for n in moved_nodes}
    replace_nodes(graph, [n for n in graph.node if n.output[0] not in moving])

    axes = add_int64(graph, names, "axis", [axis])
    zero = add_int64(graph, names, "zero", [0])
    pads, padded = names("pads"), names("padded_in")
    graph.node.append(make_node("Concat", [zero, plan.pad], [pads], names("Concat"), axis=0))
    graph.node.append(make_node("Pad", [sliced, pads, "", axes], [padded], names("Pad")))

    it, cond_in, cond_out = names("iter"), names("cond_in"), names("cond_out")
    start, end, block, block_out = names("start"), names("end"), names("block"), names("block_out")
    body_nodes = [
        make_node("Mul", [it, plan.size], [start], names("Mul")),
        make_node("Add", [start, plan.size], [end], names("Add")),
        make_node("Slice", [padded, start, end, axes], [block], names("Slice")),
    ]
    for copy in moved_nodes:
        for idx, name in enumerate(copy.input):
            if name == sliced:
                copy.input[idx] = block
        for idx, name in enumerate(copy.output):
            if name == output:
                copy.output[idx] = block_out
        body_nodes.append(copy)
    body_nodes.append(make_node("Identity", [cond_in], [cond_out], names("Identity")))
    body = helper.make_graph(
        body_nodes,
        names("body"),
        [
            helper.make_tensor_value_info(it, onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info(cond_in, onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(cond_out, onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info(block_out, output_elem_type, None),
        ],
    )
    scanned, moved, shape, head, tail, target, merged = (
        names(h) for h in ("scanned", "moved", "shape", "head", "tail", "target", "merged")
    )
    loop = make_node("Loop", [plan.trips, ""], [scanned], names("Loop"), body=body)
    perm = [*range(1, axis + 1), 0, *range(axis + 1, rank + 1)]
    graph.node.extend(
        [
            loop,
            make_node("Transpose", [scanned], [moved], names("Transpose"), perm=perm),
            make_node("Shape", [moved], [shape], names("Shape")),
            make_node(
                "Slice", [shape, zero, add_int64(graph, names, "upto", [axis])], [head], names("Slice")
            ),
            make_node(
                "Slice",
                [
                    shape,
                    add_int64(graph, names, "after", [axis + 2]),
                    add_int64(graph, names, "end", [rank + 1]),
                ],
                [tail],
                names("Slice"),
            ),
            make_node(
                "Concat",
                [head, add_int64(graph, names, "minus1", [-1]), tail],
                [target],
                names("Concat"),
                axis=0,
            ),
            make_node("Reshape", [moved, target], [merged], names("Reshape")),
            make_node("Slice", [merged, zero, plan.length, axes], [output], names("Slice")),
        ]
    )
    return loop
