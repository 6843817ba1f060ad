"""Graph passes on exported ONNX files: GQA without repeat_kv, chunked attention, flash MHA, chunked MLP.

Each pass is a small ``ModelProto -> None`` (in place) or file -> file transform; ``pipeline``
composes them into the ``plain`` / ``fused`` / ``chunked`` / ``ort-chunked`` export variants.
"""

from bundle.manifest import GRAPH_VARIANTS, GraphVariant
from export.passes.chunk_attention import chunk_attention, default_query_chunk
from export.passes.chunk_mlp import chunk_mlp
from export.passes.gqa import drop_repeat_kv
from export.passes.mha_attention import mha_attention
from export.passes.onnx_proto import PassError, op_counts
from export.passes.pipeline import (
    FUSED_OPSET,
    GraphReport,
    apply_for_export,
    apply_graph_variant,
    export_opset,
    portable_variant,
    required_opset,
    resolve_variant,
)

__all__ = [
    "FUSED_OPSET",
    "GRAPH_VARIANTS",
    "GraphReport",
    "GraphVariant",
    "PassError",
    "apply_for_export",
    "apply_graph_variant",
    "chunk_attention",
    "chunk_mlp",
    "default_query_chunk",
    "drop_repeat_kv",
    "export_opset",
    "mha_attention",
    "op_counts",
    "portable_variant",
    "required_opset",
    "resolve_variant",
]
