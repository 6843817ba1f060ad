"""Qwen2 attention as ONNX Runtime's ``com.microsoft.MultiHeadAttention`` on its flash CPU path.

Why: ORT's CPU kernels for the opset-23 ``Attention`` and for ``MultiHeadAttention`` *with* a
``key_padding_mask`` or ``attention_bias`` materialise fp32 ``[B, H, S, S]`` scores; only
``MultiHeadAttention`` with no mask, no bias and no KV cache takes MLAS's blocked flash kernel
(``MlasFlashAttention``, onnxruntime/contrib_ops/cpu/bert/multihead_attention.cc), which never
holds more than a cache-sized block of scores. Measured on one layer, 2 threads, 8×512 tokens,
4 heads of 16: 47 ms with the exporter's ``[B,1,S,S]`` mask, 19 ms on the flash path.

The padding mask therefore goes into K, not into a mask input: every head gets one extra
query/key dimension, 1 in Q and 0 (real token) or ``PAD_SCORE`` (padding) in K, so that
``q'·k' = q·k`` for real keys and ``≈ PAD_SCORE`` for padded ones. ``scale`` is set explicitly to
the original ``1/sqrt(d)`` (the op's default would use ``d + 1``). After scaling, a padded key's
score is below ``-1e7``: ``exp`` of it is exactly 0 in fp32, also across the kernel's online-softmax
blocks (a block of only padding is rescaled by ``exp(-1e7) = 0`` once a real key is seen). Real
keys' scores are the same sums as before (the extra term is ``1 · 0``). GQA: MHA has one head
count, so K/V heads are repeated (an ``Expand`` of ``[B, S, H·d]``, linear in S).

RoPE runs on the ``[B, S, hidden]`` projections (``RotaryEmbedding`` with ``num_heads``, the same
cos/sin caches), so Q/K/V reach MHA in its native BSD layout and its output is already the
``[B, S, H, d]`` the exporter's Transpose produced: no head transposes remain.

float32 only: ORT registers ``MultiHeadAttention`` for float on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from export.passes._loop import plan_chunks, sequence_length, wrap_in_loop
from export.passes.onnx_proto import (
    MS_DOMAIN,
    Names,
    PassError,
    add_int64,
    consumers,
    import_ms_domain,
    make_node,
    producers,
    remove_dead_nodes,
    replace_nodes,
    topo_sort,
    value_elem_type,
)

MASK_INPUT = "attention_mask"
PAD_SCORE = -1e9  # q'·k' of a padded key before scaling; any |x| ≫ the real scores works


@dataclass(frozen=True)
class _Site:
    """One exporter attention block: the projections before RoPE and where its output goes."""

    attention: onnx.NodeProto
    q_lin: str
    k_lin: str
    v_lin: str
    q_rope: onnx.NodeProto
    k_rope: onnx.NodeProto
    heads: int
    kv_heads: int
    scale: float
    output: str  # the [B, S, H, d] value after the exporter's output Transpose


def _attr(node: onnx.NodeProto, name: str, default: float | int | None = None) -> float | int | None:
    for attr in node.attribute:
        if attr.name == name:
            return attr.f if attr.type == onnx.AttributeProto.FLOAT else attr.i
    return default


def _head_split(name: str, prod: dict[str, onnx.NodeProto]) -> str | None:
    """If ``name`` is Transpose(Reshape(x), perm=[0,2,1,3]) — the exporter's head split — return x."""
    transpose = prod.get(name)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = [a.ints for a in transpose.attribute if a.name == "perm"]
    if not perm or list(perm[0]) != [0, 2, 1, 3]:
        return None
    reshape = prod.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    return str(reshape.input[0])


def _roped(name: str, prod: dict[str, onnx.NodeProto]) -> tuple[onnx.NodeProto, str] | None:
    rope = prod.get(name)
    if rope is None or rope.op_type != "RotaryEmbedding" or len(rope.input) != 3:
        return None  # position_ids as a 4th input would need the 4-D layout; not what the exporter writes
    if _attr(rope, "interleaved", 0) != 0 or _attr(rope, "rotary_embedding_dim", 0) != 0:
        return None
    lin = _head_split(rope.input[0], prod)
    return None if lin is None else (rope, lin)


def _site(
    node: onnx.NodeProto, prod: dict[str, onnx.NodeProto], cons: dict[str, list[onnx.NodeProto]]
) -> _Site:
    label = node.name or node.output[0]
    if _attr(node, "is_causal", 0) != 0:
        raise PassError(f"{label}: causal Attention; the key-padding rewrite is not exact")
    if _attr(node, "softcap", 0.0) != 0.0 or _attr(node, "qk_matmul_output_mode", 0) != 0:
        raise PassError(f"{label}: softcap / qk output not supported by MultiHeadAttention")
    if len(node.input) != 4 or len([o for o in node.output if o]) != 1:
        raise PassError(f"{label}: expected Attention(Q, K, V, mask) -> Y without a KV cache")
    scale = _attr(node, "scale", 0.0)
    if not scale:
        raise PassError(f"{label}: Attention without an explicit scale")
    q, k = _roped(node.input[0], prod), _roped(node.input[1], prod)
    v_lin = _head_split(node.input[2], prod)
    if q is None or k is None or v_lin is None:
        raise PassError(f"{label}: Q/K are not RoPE(head split) or V is not a head split (run 'fused' first)")
    users = cons.get(node.output[0], [])
    if len(users) != 1 or _head_split_back(users[0]) is None:
        raise PassError(f"{label}: output is not transposed back to [B, S, H, d]")
    heads, kv_heads = _attr(q[0], "num_heads", 0), _attr(k[0], "num_heads", 0)
    if not heads or not kv_heads or int(heads) % int(kv_heads):
        raise PassError(f"{label}: RotaryEmbedding without usable num_heads ({heads}, {kv_heads})")
    return _Site(
        node, q[1], k[1], v_lin, q[0], k[0], int(heads), int(kv_heads), float(scale), users[0].output[0]
    )


def _head_split_back(node: onnx.NodeProto) -> onnx.NodeProto | None:
    perm = [a.ints for a in node.attribute if a.name == "perm"]
    ok = node.op_type == "Transpose" and perm and list(perm[0]) == [0, 2, 1, 3]
    return node if ok else None


def _key_bias(graph: onnx.GraphProto, names: Names) -> str:
    """``[B, S, 1, 1]``: 0 for real tokens, ``PAD_SCORE`` for padding (mask value 0)."""
    as_bool, bias, out = names("mask_bool"), names("key_bias"), names("key_bias4")
    zero = names("zero_f")
    pad = names("pad_score")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(0.0, np.float32), zero),
            numpy_helper.from_array(np.asarray(PAD_SCORE, np.float32), pad),
        ]
    )
    graph.node.extend(
        [
            make_node("Cast", [MASK_INPUT], [as_bool], names("Cast"), to=onnx.TensorProto.BOOL),
            make_node("Where", [as_bool, zero, pad], [bias], names("Where")),
            make_node(
                "Unsqueeze", [bias, add_int64(graph, names, "axes", [2, 3])], [out], names("Unsqueeze")
            ),
        ]
    )
    return out


def _rewrite(graph: onnx.GraphProto, names: Names, site: _Site, key_bias: str) -> onnx.NodeProto:
    """Add the BSD Q'/K'/V' and the MHA node; returns the MHA node (its output is ``[B, S, H·d]``)."""
    groups = site.heads // site.kv_heads

    def value(hint: str) -> str:
        return names(hint)

    def rope(src: onnx.NodeProto, lin: str, heads: int) -> str:
        out = value("rope3d")
        graph.node.append(
            make_node(
                "RotaryEmbedding",
                [lin, src.input[1], src.input[2]],
                [out],
                names("RotaryEmbedding"),
                num_heads=heads,
                interleaved=0,
            )
        )
        return out

    def reshape(x: str, shape: list[int]) -> str:
        out = value("reshape")
        graph.node.append(
            make_node("Reshape", [x, add_int64(graph, names, "shape", shape)], [out], names("Reshape"))
        )
        return out

    def repeat_heads(x4: str) -> str:
        """[B, S, Hkv, e] → [B, S, Hkv·g·e] with each KV head repeated g times (head h reads h // g)."""
        if groups == 1:
            return reshape(x4, [0, 0, -1])
        five, out = value("unsq"), value("repeat")
        graph.node.extend(
            [
                make_node(
                    "Unsqueeze", [x4, add_int64(graph, names, "axes", [3])], [five], names("Unsqueeze")
                ),
                make_node(
                    "Expand",
                    [five, add_int64(graph, names, "groups", [1, 1, 1, groups, 1])],
                    [out],
                    names("Expand"),
                ),
            ]
        )
        return reshape(out, [0, 0, -1])

    # Q' = [q, 1] per head
    q4 = reshape(rope(site.q_rope, site.q_lin, site.heads), [0, 0, site.heads, -1])
    q_ext = value("q_ext")
    pads = add_int64(graph, names, "pads", [0, 0, 0, 0, 0, 0, 0, 1])
    one = names("one_f")
    graph.initializer.append(numpy_helper.from_array(np.asarray(1.0, np.float32), one))
    graph.node.append(make_node("Pad", [q4, pads, one], [q_ext], names("Pad")))
    q_in = reshape(q_ext, [0, 0, -1])
    # K' = [k, bias] per KV head, then repeated to every query head of its group
    k4 = reshape(rope(site.k_rope, site.k_lin, site.kv_heads), [0, 0, site.kv_heads, -1])
    bias_heads, k_ext = value("bias_heads"), value("k_ext")
    graph.node.extend(
        [
            make_node(
                "Expand",
                [key_bias, add_int64(graph, names, "kv_heads", [1, 1, site.kv_heads, 1])],
                [bias_heads],
                names("Expand"),
            ),
            make_node("Concat", [k4, bias_heads], [k_ext], names("Concat"), axis=-1),
        ]
    )
    k_in = repeat_heads(k_ext)
    v_in = repeat_heads(reshape(site.v_lin, [0, 0, site.kv_heads, -1]))
    mha_out = value("mha")
    mha = make_node(
        "MultiHeadAttention",
        [q_in, k_in, v_in],
        [mha_out],
        names("MultiHeadAttention"),
        num_heads=site.heads,
        scale=site.scale,
    )
    mha.domain = MS_DOMAIN
    graph.node.append(mha)
    graph.node.append(
        make_node(
            "Reshape",
            [mha_out, add_int64(graph, names, "heads_shape", [0, 0, site.heads, -1])],
            [site.output],
            names("Reshape"),
        )
    )
    return mha


def mha_attention(model: onnx.ModelProto, chunk: int | None = 1024) -> int:
    """Rewrite every opset-23 ``Attention`` of a fused qwen2 graph into flash ``MultiHeadAttention``.

    ``chunk``: queries per block of a Loop around each MHA (None: one piece). The flash kernel
    needs no blocking for memory; the Loop keeps the graph's declared ``attention_query_chunk``
    (which the service's memory model reads) an upper bound of what it holds.
    Returns the number of Attention nodes rewritten.
    """
    graph = model.graph
    if MASK_INPUT not in {i.name for i in graph.input}:
        raise PassError(f"graph has no {MASK_INPUT!r} input")
    prod, cons = producers(graph), consumers(graph)
    nodes = [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not nodes:
        raise PassError("no opset-23 Attention node: export with opset 23 first")
    for node in nodes:
        if value_elem_type(graph, node.input[0]) != onnx.TensorProto.FLOAT:
            raise PassError("MultiHeadAttention runs float32 only on ORT's CPU provider")
    sites = [_site(n, prod, cons) for n in nodes]
    names = Names(graph, "mha_attention")
    key_bias = _key_bias(graph, names)
    dead = {s.output for s in sites}
    replace_nodes(graph, [n for n in graph.node if not (set(n.output) & dead)])  # the output Transposes
    mhas = [_rewrite(graph, names, site, key_bias) for site in sites]
    import_ms_domain(model)
    if chunk is not None:
        plan = plan_chunks(graph, names, sequence_length(graph, names, MASK_INPUT), chunk)
        for mha in mhas:
            wrap_in_loop(
                graph,
                names,
                [mha],
                sliced=mha.input[0],
                axis=1,
                rank=3,
                output=mha.output[0],
                output_elem_type=onnx.TensorProto.FLOAT,
                plan=plan,
            )
    remove_dead_nodes(graph)
    topo_sort(graph)
    return len(sites)
