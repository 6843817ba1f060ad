"""Precisions: how each one's graph is produced, and the proof that it is what it claims.

* ``fp32`` — the reference artifact (and what TensorRT builds from).
* ``fp16`` (``mixed``, default) — exported from a half-precision PyTorch model in which only the
  heavy blocks run in fp16 (the family's ``fp16_islands``). Embedding output, every
  RMSNorm/LayerNorm and the **residual stream stay fp32**. Qwen2-class models carry residual
  values beyond fp16's 65504 ("massive activations"); summing them in fp16 gives inf and then
  NaN at the next norm. Per-block outputs are small, their running sum is not — so the residual
  add is where fp32 matters. ``naive`` (everything fp16) exists for the test that shows the
  failure mode.
* ``int8`` — see :mod:`export.quantize`.

Everything this module needs comes in as arguments (the resolved graph variant and opset, the
reference and sequences for the fp16 numerics check, calibration ids): it never reaches back
into the orchestrator.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from bundle.manifest import GraphVariant, Pooling, Precision
from export import quantize
from export.checkpoint import Checkpoint
from export.embedder import Embedder, build_embedder
from export.reference import Reference
from export.to_onnx import ExternalData, export_onnx
from export.validate import gate_torch, measure_torch

log = logging.getLogger(__name__)
Fp16Mode = Literal["mixed", "naive"]
Int8Method = quantize.Int8Method
CALIBRATED: tuple[Int8Method, ...] = ("qdq", "per-token")  # methods whose scales come from text


@dataclass(frozen=True)
class Plan:
    """What to produce: every decision already made by the caller (nothing is re-derived here)."""

    precision: Precision
    variant: GraphVariant
    opset: int
    max_input_tokens: int
    external_data: ExternalData = "auto"
    attention_query_chunk: int | None = None
    int8_method: Int8Method = "per-token"
    fp16_mode: Fp16Mode = "mixed"
    debug_causal: bool = False
    debug_pooling: Pooling | None = None


@dataclass(frozen=True)
class Fp16Check:
    """The PyTorch-fp16 numerics check run before the (slow) export: fails an overflowing model in
    seconds, because CPU ONNX Runtime upcasts fp16 arithmetic and cannot see the overflow."""

    reference: Reference
    seqs: Sequence[Sequence[int]]
    pad_id: int

    def run(self, module: torch.nn.Module, precision: Precision) -> dict[str, float]:
        log.info("checking fp16 numerics in PyTorch (CPU ORT upcasts fp16 arithmetic)")
        metrics = measure_torch(module, self.reference, self.seqs, self.pad_id)
        gate_torch(metrics, precision)
        return metrics


@dataclass(frozen=True)
class Artifact:
    """What a precision step produced: external files, batch invariance, and op-count checks."""

    external_data: list[str]
    batch_invariant: bool = True
    checks: dict[str, float | int | str | bool] = field(default_factory=dict)
    attention_query_chunk: int | None = None  # set when the graph computes attention in query blocks
    mlp_chunk: int | None = None  # set when the graph computes the MLP in sequence blocks


def _fp16_embedder(ckpt: Checkpoint, mode: Fp16Mode, **kw: Any) -> Embedder:
    if mode == "naive":
        return build_embedder(ckpt, dtype=torch.float16, **kw)
    # Small models load in fp32 (exact norm gains); large ones load in fp16 once, so a 7B export
    # never holds a full fp32 copy — the islands only upcast the small modules.
    small = ckpt.num_parameters_estimate < 1_000_000_000
    embedder = build_embedder(ckpt, dtype=torch.float32 if small else torch.float16, **kw)
    ckpt.family.fp16_islands(embedder.backbone)
    return embedder


def produce(
    ckpt: Checkpoint,
    stage: Path,
    name: str,
    plan: Plan,
    *,
    fp16_check: Fp16Check | None = None,
    calibration: Sequence[Sequence[int]] = (),
) -> Artifact:
    """Write ``stage/name`` (+ external data) as ``plan`` says and return what was produced.

    ``fp16_check`` runs on the fp16 PyTorch module *before* export; ``calibration`` holds the token
    ids for static int8 scales (``qdq``) and smoothing (``per-token``).
    """
    hooks: dict[str, Any] = {"causal": plan.debug_causal, "pooling": plan.debug_pooling}
    export_kw: dict[str, Any] = {
        "pad_id": ckpt.pad_id,
        "vocab_size": ckpt.vocab_size,
        "opset": plan.opset,
        "external_data": plan.external_data,
    }
    if plan.precision == "fp16":
        embedder = _fp16_embedder(ckpt, plan.fp16_mode, **hooks)
        checks: dict[str, float | int | str | bool] = {"fp16_mode": plan.fp16_mode}
        checks.update(fp16_check.run(embedder, plan.precision) if fp16_check is not None else {})
        files = export_onnx(embedder, stage / name, **export_kw)
        chunk, mlp = _graph_passes(stage / name, ckpt, plan)
        return Artifact(files, checks=checks, attention_query_chunk=chunk, mlp_chunk=mlp)
    embedder = build_embedder(ckpt, **hooks)
    if plan.precision == "fp32":
        files = export_onnx(embedder, stage / name, **export_kw)
        chunk, mlp = _graph_passes(stage / name, ckpt, plan)
        return Artifact(files, attention_query_chunk=chunk, mlp_chunk=mlp)
    work = stage / "_fp32"
    work.mkdir()
    try:
        export_onnx(embedder, work / name, **export_kw)
        chunk, mlp = _graph_passes(work / name, ckpt, plan, quantize_next=True)
        del embedder  # the quantiser needs the memory more than we need the torch model
        feeds = quantize.calibration_feeds(calibration) if plan.int8_method in CALIBRATED else []
        result = quantize.quantize(
            work / name, stage / name, plan.int8_method, feeds, external_data=plan.external_data
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


def _graph_passes(
    path: Path, ckpt: Checkpoint, plan: Plan, quantize_next: bool = False
) -> tuple[int | None, int | None]:
    """Apply the plan's graph variant in place; returns the attention and MLP chunk sizes."""
    from export.passes import apply_for_export

    report = apply_for_export(
        path,
        plan.variant,
        ckpt.config,
        max_input_tokens=plan.max_input_tokens,
        query_chunk=plan.attention_query_chunk,
        quantize_next=quantize_next,
    )
    return report.attention_query_chunk, report.mlp_chunk
