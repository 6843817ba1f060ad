"""Apply the graph passes to a saved ONNX file, leaving its external weight files untouched.

Why file → file on the graph only: the 7B's weights are 28 GB of external data. The passes
rewrite structure (a few hundred nodes) and add only tiny int64 constants, so the graph is
loaded without its weights, rewritten and saved next to the same external files, whose
relative references stay valid. Nothing here holds a weight in memory.

Variants (the export option ``graph``):

* ``plain``   – the exporter's graph as is (any opset).
* ``fused``   – needs the opset-23 export (native Attention / RotaryEmbedding /
  RMSNormalization); drops the materialised GQA ``repeat_kv``.
* ``chunked`` – ``fused`` + key-padding mask + query-chunked attention + (optionally)
  sequence-chunked MLP: memory linear in the input length; qwen2's default.
* ``ort-chunked`` – ``chunked`` with qwen2 attention as ONNX Runtime's
  ``com.microsoft.MultiHeadAttention`` on its flash CPU path (``mha_attention``; padding folded
  into K, no S² scores at any length); qwen2's fp32 default. float32 graphs, ORT only.
* ``ort-fused`` – BERT self-attention as ONNX Runtime contrib ops (any opset); BERT's fp32 and
  int8 default. For fp32 one ``com.microsoft.Attention`` per layer (Q/K/V packed into its weight
  input); when the graph is to be quantised, ``com.microsoft.MultiHeadAttention`` on the Q/K/V
  ``MatMul`` outputs instead, so the projections stay quantisable. Loads the weights: BERT-sized
  models only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper

from bundle.manifest import GraphVariant
from export.passes.bert_attention import fuse_bert_attention, fuse_bert_attention_core
from export.passes.chunk_attention import chunk_attention, default_query_chunk
from export.passes.chunk_mlp import chunk_mlp
from export.passes.gqa import drop_repeat_kv
from export.passes.mha_attention import mha_attention
from export.passes.onnx_proto import PassError, op_counts, opset_version

FUSED_OPSET = 23
_INLINE_LIMIT = 4096  # bytes: small external constants (axes, shapes) are pulled inline


@dataclass(frozen=True)
class GraphReport:
    """What the passes did, for logs and the bundle manifest."""

    variant: GraphVariant
    attention_query_chunk: int | None = None
    mlp_chunk: int | None = None
    gqa_attention_nodes: int = 0
    ops: dict[str, int] = field(default_factory=dict)


def required_opset(variant: GraphVariant) -> int | None:
    """The export opset a variant needs (None: whatever the exporter uses)."""
    return FUSED_OPSET if variant in ("fused", "chunked", "ort-chunked") else None


def load_graph(path: Path) -> onnx.ModelProto:
    """Load ``path`` without its large external tensors (small ones are read inline)."""
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        if int(info.get("length", _INLINE_LIMIT + 1)) <= _INLINE_LIMIT:
            external_data_helper.load_external_data_for_tensor(init, str(path.parent))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    return model


def _has_external(model: onnx.ModelProto) -> bool:
    return any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)


def _load_for(path: Path, target: Path) -> onnx.ModelProto:
    """Graph only when the result stays beside its weight files; whole model when it moves."""
    model = load_graph(path)
    if target.parent.resolve() != path.parent.resolve() and _has_external(model):
        model = onnx.load(str(path))
    return model


def _save(model: onnx.ModelProto, path: Path, target: Path) -> None:
    """In place: the graph alone (weight references unchanged). Moved: weights go to a new side file."""
    if target.parent.resolve() != path.parent.resolve() and _has_external(load_graph(path)):
        onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data")
    else:
        onnx.save(model, str(target))


def apply_graph_variant(
    path: Path,
    variant: GraphVariant,
    *,
    query_chunk: int = 1024,
    mlp_chunk: int | None = 2048,
    out: Path | None = None,
    num_heads: int | None = None,
    quantizable: bool = False,
) -> GraphReport:
    """Rewrite the ONNX file at ``path`` (in place unless ``out``) into ``variant``.

    ``mlp_chunk=None`` keeps the MLP in one piece: required before ``quantize_dynamic``, whose
    quantiser does not rewrite MatMuls inside Loop bodies. ``num_heads`` is needed by ``ort-fused``;
    ``quantizable`` makes it keep the Q/K/V projections as MatMuls (the int8 quantisers' input).
    """
    target = out or path
    if variant == "ort-fused":
        return _ort_fused(path, target, num_heads, quantizable)
    model = _load_for(path, target)
    if variant != "plain" and opset_version(model) < FUSED_OPSET:
        raise PassError(
            f"graph variant {variant!r} needs an opset-{FUSED_OPSET} export, got opset {opset_version(model)}"
        )
    gqa = drop_repeat_kv(model) if variant != "plain" else 0
    chunk = None
    mlp = None
    if variant in ("chunked", "ort-chunked"):
        if variant == "chunked":
            chunk_attention(model, chunk=query_chunk)
        else:
            mha_attention(model, chunk=query_chunk)
        chunk = query_chunk
        if mlp_chunk is not None:
            try:
                chunk_mlp(model, chunk=mlp_chunk)
                mlp = mlp_chunk
            except PassError:  # e.g. an fp16 graph whose MLP the matcher does not recognise
                mlp = None
    _save(model, path, target)
    onnx.checker.check_model(str(target))  # by path: resolves external data, allows > 2 GiB
    return GraphReport(
        variant=variant,
        attention_query_chunk=chunk,
        mlp_chunk=mlp,
        gqa_attention_nodes=gqa,
        ops=dict(op_counts(model)),
    )


def _ort_fused(path: Path, target: Path, num_heads: int | None, quantizable: bool) -> GraphReport:
    if num_heads is None:
        raise PassError("graph variant 'ort-fused' needs the model's num_heads")
    external = _has_external(load_graph(path))
    model = onnx.load(str(path))  # with weights: Q/K/V get packed into one matrix (or their biases)
    (fuse_bert_attention_core if quantizable else fuse_bert_attention)(model, num_heads)
    if external:
        side = target.parent / (target.name + ".data")
        side.unlink(missing_ok=True)  # onnx appends to an existing side file; the weights are in memory
        onnx.save(model, str(target), save_as_external_data=True, location=side.name)
    else:
        onnx.save(model, str(target))
    onnx.checker.check_model(str(target))
    return GraphReport(variant="ort-fused", ops=dict(op_counts(model)))


def resolve_variant(
    default: GraphVariant, requested: GraphVariant | None, opset: int | None = None
) -> GraphVariant:
    """``requested``, else the family's ``default`` (``FamilySpec.default_graph``). An explicit
    opset below 23 turns an opset-23 default into ``plain``."""
    if requested is not None:
        return requested
    if opset is not None and opset < FUSED_OPSET and required_opset(default) is not None:
        return "plain"
    return default


# The same graph without ONNX Runtime contrib ops, for artifacts another runtime builds from.
_PORTABLE: dict[GraphVariant, GraphVariant] = {"ort-chunked": "chunked", "ort-fused": "plain"}


def portable_variant(variant: GraphVariant) -> GraphVariant:
    """``variant`` minus ORT's com.microsoft ops: QDQ int8 exists for TensorRT, which has none."""
    return _PORTABLE.get(variant, variant)


def export_opset(variant: GraphVariant, family_opset: int, requested: int | None = None) -> int:
    """Opset to export with: the family's for ``plain``, 23 for the fused variants."""
    needed = required_opset(variant)
    if requested is not None and needed is not None and requested != needed:
        raise PassError(f"graph {variant!r} needs opset {needed}; --opset {requested} was given")
    return requested or needed or family_opset


def apply_for_export(
    path: Path,
    variant: GraphVariant,
    config: dict[str, object],
    *,
    max_input_tokens: int,
    query_chunk: int | None = None,
    quantize_next: bool = False,
) -> GraphReport:
    """What the exporter calls right after saving a graph.

    ``query_chunk`` defaults to :func:`default_query_chunk` for the model's heads and input limit.
    ``quantize_next`` keeps the MLP unchunked (the int8 quantisers skip MatMuls inside Loops) and the
    BERT Q/K/V projections as MatMuls.
    """
    if variant == "plain":
        return GraphReport(variant="plain")
    heads = int(str(config.get("num_attention_heads", 1)))
    chunk = query_chunk or default_query_chunk(heads, max_input_tokens)
    return apply_graph_variant(
        path,
        variant,
        query_chunk=chunk,
        mlp_chunk=None if quantize_next else 2048,
        num_heads=heads,
        quantizable=quantize_next,
    )
