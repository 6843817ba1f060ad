"""Precisions: how each one's graph is produced, and the proof that it is what it claims.

* ``fp32`` — the reference artifact (and what TensorRT builds from).
* ``fp16`` (``mixed``, default) — exported from a half-precision PyTorch model in which only the
  heavy blocks run in fp16: Qwen2's attention and MLP blocks, BERT's Linear layers. Embedding
  output, every RMSNorm/LayerNorm and the **residual stream stay fp32**. Qwen2-class models carry
  residual values beyond fp16's 65504 ("massive activations"); summing them in fp16 gives inf and
  then NaN at the next norm. Per-block outputs are small, their running sum is not — so the
  residual add is where fp32 matters. ``naive`` (everything fp16) exists for the test that shows
  the failure mode.
* ``int8`` — see :mod:`export.quantize`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from bundle.manifest import Precision
from export import quantize
from export.checkpoint import Checkpoint
from export.graph import Embedder, build_embedder
from export.to_onnx import export_onnx

if TYPE_CHECKING:
    from export.api import ExportOptions

Fp16Mode = Literal["mixed", "naive"]
Int8Method = quantize.Int8Method


@dataclass(frozen=True)
class Artifact:
    """What a precision step produced: external files, batch invariance, and op-count checks."""

    external_data: list[str]
    batch_invariant: bool = True
    checks: dict[str, float | int | str | bool] = field(default_factory=dict)
    attention_query_chunk: int | None = None  # set when the graph computes attention in query blocks
    mlp_chunk: int | None = None  # set when the graph computes the MLP in sequence blocks


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


class Fp16Island(nn.Module):
    """Runs ``inner`` (already in fp16) on fp16 copies of its inputs; returns fp32 outputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.half()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(
            *_cast(args, torch.float16), **{k: _cast(v, torch.float16) for k, v in kwargs.items()}
        )
        return _cast(out, torch.float32)


def _islands(embedder: Embedder, family: str) -> Embedder:
    """Turn an embedder into the mixed layout: fp16 blocks, fp32 norms and residual stream.

    Only small modules are upcast (norm gains, RoPE frequencies), so a model loaded in fp16 is
    never materialised in fp32 as a whole.
    """
    backbone: Any = embedder.backbone  # a transformers model: attributes are dynamic
    if family == "qwen2":
        for layer in backbone.layers:
            layer.self_attn = Fp16Island(layer.self_attn)
            layer.mlp = Fp16Island(layer.mlp)
            layer.input_layernorm.float()
            layer.post_attention_layernorm.float()
        backbone.norm.float()
        backbone.rotary_emb.float()
        # fp16 table (half the bytes of the largest tensor), fp32 rows into the residual stream
        backbone.embed_tokens = Fp16Island(backbone.embed_tokens)
    else:  # BERT-sized models: everything fp32 except the Linear layers
        backbone.float()
        for parent in list(backbone.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fp16Island(child))
    return embedder


def _fp16_embedder(ckpt: Checkpoint, mode: Fp16Mode, **kw: Any) -> Embedder:
    if mode == "naive":
        return build_embedder(ckpt, dtype=torch.float16, **kw)
    # Small models load in fp32 (exact norm gains); large ones load in fp16 once, so a 7B export
    # never holds a full fp32 copy — _islands only upcasts the small modules.
    small = ckpt.num_parameters_estimate < 1_000_000_000
    embedder = build_embedder(ckpt, dtype=torch.float32 if small else torch.float16, **kw)
    return _islands(embedder, ckpt.family.name)


def produce(
    ckpt: Checkpoint,
    stage: Path,
    name: str,
    precision: Precision,
    *,
    opset: int,
    options: ExportOptions,
    fp16_probe: Callable[[nn.Module], dict[str, float]] | None = None,
) -> Artifact:
    """Write ``stage/name`` (+ external data) in ``precision`` and return what was produced.

    ``fp16_probe`` checks the fp16 PyTorch module's numerics *before* the (slow) export, so an
    overflowing model fails in seconds; it raises on failure and returns metrics to record.
    """
    hooks: dict[str, Any] = {"causal": options.debug_causal, "pooling": options.debug_pooling}
    export_kw: dict[str, Any] = {
        "pad_id": ckpt.pad_id,
        "vocab_size": ckpt.vocab_size,
        "opset": opset,
        "external_data": options.external_data,
    }
    if precision == "fp16":
        embedder = _fp16_embedder(ckpt, options.fp16_mode, **hooks)
        checks: dict[str, float | int | str | bool] = {"fp16_mode": options.fp16_mode}
        checks.update(fp16_probe(embedder) if fp16_probe is not None else {})
        files = export_onnx(embedder, stage / name, **export_kw)
        chunk, mlp = _graph_passes(stage / name, ckpt, options)
        return Artifact(files, checks=checks, attention_query_chunk=chunk, mlp_chunk=mlp)
    embedder = build_embedder(ckpt, **hooks)
    if precision == "fp32":
        files = export_onnx(embedder, stage / name, **export_kw)
        chunk, mlp = _graph_passes(stage / name, ckpt, options)
        return Artifact(files, attention_query_chunk=chunk, mlp_chunk=mlp)
    work = stage / "_fp32"
    work.mkdir()
    try:
        export_onnx(embedder, work / name, **export_kw)
        chunk, mlp = _graph_passes(work / name, ckpt, options, quantize_next=True)
        del embedder  # the quantiser needs the memory more than we need the torch model
        calibration = (
            _calibration(ckpt, options.validation_max_length) if options.int8_method == "qdq" else []
        )
        result = quantize.quantize(
            work / name, stage / name, options.int8_method, calibration, external_data=options.external_data
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Artifact(
        result.external_data,
        batch_invariant=result.batch_invariant,
        checks=result.checks,
        attention_query_chunk=chunk,
        mlp_chunk=mlp,
    )


def _calibration(ckpt: Checkpoint, max_length: int) -> list[quantize.Feed]:
    """The validation corpus drawn with a different seed from the gate's (see calibration_feeds)."""
    from export.corpus import CorpusTokenizer, validation_sequences

    tok = CorpusTokenizer(ckpt)
    seqs = validation_sequences(tok, ckpt.prompts, min(max_length, ckpt.max_input_tokens), seed=1)
    return quantize.calibration_feeds(seqs)


def _graph_passes(
    path: Path, ckpt: Checkpoint, options: ExportOptions, quantize_next: bool = False
) -> tuple[int | None, int | None]:
    """Apply the export/passes graph variant in place; returns the attention and MLP chunk sizes."""
    from export.passes import apply_for_export, resolve_variant

    report = apply_for_export(
        path,
        resolve_variant(ckpt.family.name, options.graph, options.opset),
        ckpt.config,
        max_input_tokens=options.max_input_tokens or ckpt.max_input_tokens,
        query_chunk=options.attention_query_chunk,
        quantize_next=quantize_next,
    )
    return report.attention_query_chunk, report.mlp_chunk
