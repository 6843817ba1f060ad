"""One :class:`FamilySpec` per supported architecture — the only place a family's facts live.

A family decides the graph (which backbone, which pooling is allowed, which graph variant by
default, which blocks run in fp16), the tokenizer policy (EOS appended? [CLS]/[SEP] wrapping?),
the prompt policy (instruction on queries? which default tasks?) and the oracle (which reference
encoder, which weight-name prefix). Everything downstream reads these facts from the spec instead
of testing ``model_type``, so a new family is one new spec (plus its reference encoder), not a
hunt through ``if`` statements.

The callables import torch/transformers lazily: the CLI reads this module for ``--help``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bundle.manifest import Family, GraphVariant, Pooling, Precision
from export.errors import UnsupportedArchitecture

if TYPE_CHECKING:
    import torch
    from torch import nn

    from export.reference_models import Encoder

GTE_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class FamilySpec:
    """Facts about one architecture family.

    Attributes:
        name: the manifest's ``family``.
        model_types: config.json ``model_type`` values that belong to this family.
        summary: one line for error messages, e.g. what models it covers.
        default_pooling: used when the folder has no ``1_Pooling/config.json``.
        poolings: poolings the graph builder supports for this family.
        append_eos: the tokenizer policy ends every input with the EOS token (gte-Qwen2).
        wrap_cls_sep: every input is ``[CLS] … [SEP]`` (BERT).
        query_template: the instruction template for queries, or None.
        default_tasks: task name → instruction every bundle of the family offers (first = default).
        load_backbone: ``(folder, dtype, causal) -> nn.Module``, the stock transformers backbone.
        token_type_ids: the backbone takes ``token_type_ids`` (all zeros in the graph).
        fp16_islands: turns a backbone into the mixed-fp16 layout, in place.
        default_graph: the graph variant exported per precision when none is requested.
        weight_prefix: the checkpoint's prefix on backbone weight names, stripped for the oracle.
        reference: the independent reference encoder (the oracle the gate trusts).
        opset: the ONNX opset this family is verified on.
    """

    name: Family
    model_types: frozenset[str]
    summary: str
    default_pooling: Pooling
    poolings: frozenset[Pooling]
    append_eos: bool
    wrap_cls_sep: bool
    query_template: str | None
    load_backbone: Callable[[Path, torch.dtype, bool], nn.Module]
    token_type_ids: bool
    fp16_islands: Callable[[nn.Module], None]
    default_graph: Mapping[Precision, GraphVariant]
    weight_prefix: str
    reference: Encoder
    default_tasks: Mapping[str, str] = field(default_factory=dict)
    opset: int = 20


def _qwen2_backbone(folder: Path, dtype: torch.dtype, causal: bool) -> nn.Module:
    """``config.is_causal`` is *set*, never read from the download: gte-Qwen2's configs have
    disagreed about it across revisions, and stock Qwen2 defaults to causal. ``causal=True``
    exists only so tests can prove that the validation gate rejects a causal graph."""
    from transformers import AutoConfig, Qwen2Model

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    config.is_causal = causal
    config.use_cache = False
    config.use_sliding_window = False
    model: nn.Module = Qwen2Model.from_pretrained(
        str(folder), config=config, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    return model


def _bert_backbone(folder: Path, dtype: torch.dtype, causal: bool) -> nn.Module:
    """BERT without its pooler (pooling is ours); ``causal`` has no meaning for an encoder."""
    from transformers import BertModel

    model: nn.Module = BertModel.from_pretrained(
        str(folder), dtype=dtype, attn_implementation="sdpa", add_pooling_layer=False, local_files_only=True
    )
    return model


def _qwen2_islands(backbone: Any) -> None:
    """Attention and MLP blocks in fp16; every RMSNorm, RoPE and the residual stream fp32 (the
    residual sum of a Qwen2-class model exceeds fp16's range). The embedding table stays fp16,
    its rows enter the residual stream as fp32."""
    from export.fp16_island import Fp16Island

    for layer in backbone.layers:
        layer.self_attn = Fp16Island(layer.self_attn)
        layer.mlp = Fp16Island(layer.mlp)
        layer.input_layernorm.float()
        layer.post_attention_layernorm.float()
    backbone.norm.float()
    backbone.rotary_emb.float()
    backbone.embed_tokens = Fp16Island(backbone.embed_tokens)


def _bert_islands(backbone: Any) -> None:
    """BERT-sized models: everything fp32 except the Linear layers."""
    from torch import nn

    from export.fp16_island import Fp16Island

    backbone.float()
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Fp16Island(child))


def _qwen2_reference(*args: Any, **kwargs: Any) -> Any:
    from export.reference_models import qwen2_encode

    return qwen2_encode(*args, **kwargs)


def _bert_reference(*args: Any, **kwargs: Any) -> Any:
    from export.reference_models import bert_encode

    return bert_encode(*args, **kwargs)


QWEN2 = FamilySpec(
    name="qwen2",
    model_types=frozenset({"qwen2"}),
    summary="qwen2 (gte-Qwen2-7B/1.5B-instruct and other Qwen2 decoders run bidirectionally)",
    default_pooling="last_token",
    poolings=frozenset({"last_token", "mean"}),
    append_eos=True,
    wrap_cls_sep=False,
    query_template="Instruct: {task}\nQuery: {text}",
    default_tasks={"web_search": GTE_DEFAULT_INSTRUCTION},
    load_backbone=_qwen2_backbone,
    token_type_ids=False,
    fp16_islands=_qwen2_islands,
    # bounded memory at any length, parity-gated like every graph. fp32 and int8: attention on ORT's
    # flash MultiHeadAttention kernel (docs/benchmarks.md, raw section; int8 quantises the projections
    # around it, which stay top-level MatMuls); fp16 keeps ``chunked``: GPU bundles, where the
    # d+1-wide Q/K heads of ``ort-chunked`` are untested. QDQ int8 falls back to ``chunked``.
    default_graph={"fp32": "ort-chunked", "fp16": "chunked", "int8": "ort-chunked"},
    weight_prefix="model.",
    reference=_qwen2_reference,
)

BERT = FamilySpec(
    name="bert",
    model_types=frozenset({"bert"}),
    summary="bert (all-MiniLM-L6-v2 and other BERT encoders with mean or CLS pooling)",
    default_pooling="mean",
    poolings=frozenset({"mean", "cls"}),
    append_eos=False,
    wrap_cls_sep=True,
    query_template=None,
    load_backbone=_bert_backbone,
    token_type_ids=True,
    fp16_islands=_bert_islands,
    # 512-token inputs need no chunking; opset 23 adds no native op matching post-norm layers.
    # fp32: ORT's fused Attention (docs/benchmarks.md); int8: ORT's MultiHeadAttention on the Q/K/V
    # MatMuls, which the quantisers then rewrite. fp16 islands put Casts inside the pattern: plain.
    default_graph={"fp32": "ort-fused", "fp16": "plain", "int8": "ort-fused"},
    weight_prefix="bert.",
    reference=_bert_reference,
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (QWEN2, BERT)}


def supported_summary() -> str:
    """Human-readable list of the supported families, for error messages and --help."""
    return "; ".join(spec.summary for spec in FAMILIES.values())


def family_for(model_type: str | None) -> FamilySpec:
    """The spec whose ``model_types`` contains ``model_type``; a clear error otherwise."""
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not supported. Supported families: {supported_summary()}"
    )
