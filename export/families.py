"""One :class:`FamilySpec` per supported architecture — the only place a family's facts live.

A family is what decides the graph (which backbone, which pooling is allowed), the tokenizer
policy (EOS appended? [CLS]/[SEP] wrapping?) and the prompt policy (instruction on queries?).
Everything downstream reads these facts from the spec instead of testing ``model_type``, so a
new family is one new spec, not a hunt through ``if`` statements.
"""

from __future__ import annotations

from dataclasses import dataclass

from bundle.manifest import Family, Pooling
from export.errors import UnsupportedArchitecture


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
    opset: int = 20


QWEN2 = FamilySpec(
    name="qwen2",
    model_types=frozenset({"qwen2"}),
    summary="qwen2 (gte-Qwen2-7B/1.5B-instruct and other Qwen2 decoders run bidirectionally)",
    default_pooling="last_token",
    poolings=frozenset({"last_token", "mean"}),
    append_eos=True,
    wrap_cls_sep=False,
    query_template="Instruct: {task}\nQuery: {text}",
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
