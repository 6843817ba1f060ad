"""Query-chunked attention with a key-padding mask: memory linear in S instead of heads × S².

Why: ONNX Runtime's CPU ``Attention`` (and the MultiHeadAttention contrib op) materialise the
fp32 ``[B, H, S, S]`` probabilities, and the exporter builds a ``[B, 1, S, S]`` mask; at 32k
tokens either alone exceeds the machine. The model's attention is bidirectional, so the mask is
a pure key-padding mask: ``[B, 1, 1, S]`` carries the same information (exact). Queries do not
interact, so computing attention for blocks of C queries against all keys and concatenating is
the same computation; ORT then holds only ``[B, H, C, S]`` at a time.

Input: an opset-23 graph with native ``Attention`` nodes (the fused export). Output: the same
graph, every ``Attention`` inside a ``Loop`` over query blocks, the exporter's S² mask chain gone.
"""

from __future__ import annotations

import onnx

from export.passes._loop import plan_chunks, sequence_length, wrap_in_loop
from export.passes.onnx_proto import (
    Names,
    PassError,
    add_int64,
    find_node,
    make_node,
    remove_dead_nodes,
    topo_sort,
    value_elem_type,
)

MASK_INPUT = "attention_mask"


def default_query_chunk(num_heads: int, max_tokens: int, budget_bytes: int = 512 * 1024**2) -> int:
    """Largest power-of-two block (128…1024) whose fp32 ``[H, C, S_max]`` scores fit ``budget_bytes``.

    Why: the block's score tensor is the attention's peak; 1024 was measured best on the 4-head
    tiny model (1.3 GB at 32k), while the 7B's 28 heads need 128 for the same bound.
    """
    chunk = 1024
    while chunk > 128 and num_heads * chunk * max_tokens * 4 > budget_bytes:
        chunk //= 2
    return chunk


def _attention_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    for node in nodes:
        for attr in node.attribute:
            if attr.name == "is_causal" and attr.i != 0:
                raise PassError(
                    f"{node.name or node.output[0]}: causal Attention; the key-padding mask is not exact"
                )
        if len(node.input) != 4 or not node.input[3] or len([o for o in node.output if o]) != 1:
            raise PassError(f"{node.name or node.output[0]}: expected Attention(Q, K, V, mask) -> Y")
    return nodes


def chunk_attention(model: onnx.ModelProto, chunk: int = 1024) -> int:
    """Rewrite every 4-D opset-23 ``Attention`` into a Loop over query blocks of ``chunk``.

    Returns the number of Attention nodes rewritten. Raises ``PassError`` when the graph has
    none (run it on the opset-23 export) or when an Attention is causal or has a KV cache.
    """
    graph = model.graph
    if MASK_INPUT not in {i.name for i in graph.input}:
        raise PassError(f"graph has no {MASK_INPUT!r} input")
    attention = _attention_nodes(graph)
    if not attention:
        raise PassError("no opset-23 Attention node: export with opset 23 first")
    names = Names(graph, "chunked_attention")

    # Key-padding mask [B,1,1,S] → [B,1,Cb,S] once; ORT's Attention does not broadcast the
    # query axis of the mask ("inconsistent q_sequence_length"), so expand it to one block.
    plan = plan_chunks(graph, names, sequence_length(graph, names, MASK_INPUT), chunk)
    as_bool, key_mask, mask_shape, block_mask = (
        names(h) for h in ("mask_bool", "key_mask", "mshape", "block_mask")
    )
    graph.node.extend(
        [
            make_node("Cast", [MASK_INPUT], [as_bool], names("Cast"), to=onnx.TensorProto.BOOL),
            make_node(
                "Unsqueeze",
                [as_bool, add_int64(graph, names, "axes", [1, 2])],
                [key_mask],
                names("Unsqueeze"),
            ),
            make_node(
                "Concat",
                [add_int64(graph, names, "ones", [1, 1]), plan.size, add_int64(graph, names, "one", [1])],
                [mask_shape],
                names("Concat"),
                axis=0,
            ),
            make_node("Expand", [key_mask, mask_shape], [block_mask], names("Expand")),
        ]
    )
    for output in [n.output[0] for n in attention]:
        node = find_node(graph, output)
        node.input[3] = block_mask
        wrap_in_loop(
            graph,
            names,
            [node],
            sliced=node.input[0],
            axis=2,
            rank=4,
            output=node.output[0],
            output_elem_type=value_elem_type(graph, node.output[0], value_elem_type(graph, node.input[0])),
            plan=plan,
        )
    remove_dead_nodes(graph)
    topo_sort(graph)
    return len(attention)
