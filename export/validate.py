"""The validation gate: ONNX Runtime against the independent reference, on a grid.

Grid: every corpus sequence alone (batch 1), then in padded batches of 3 and 8, each both left-
and right-padded. Each ORT row is compared with the reference (which never sees padding), with
the same sequence run alone (batch invariance), and with the other padding side. A bundle is
only called done when every number is inside its precision's tolerance; otherwise
:class:`ValidationFailed` names the metric, and the CLI exits non-zero with no bundle written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.manifest import COSINE_BOUND, Precision
from export.errors import ValidationFailed
from export.reference import Reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Per-precision limits. ``max_abs`` is on L2-normalised vectors; cosines are minima."""

    max_abs: float | None
    min_cos: float
    min_batch_cos: float


TOLERANCES: dict[Precision, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-4, min_cos=COSINE_BOUND["fp32"], min_batch_cos=0.9999),
    "fp16": Tolerance(max_abs=None, min_cos=COSINE_BOUND["fp16"], min_batch_cos=0.9999),
    "int8": Tolerance(max_abs=None, min_cos=COSINE_BOUND["int8"], min_batch_cos=0.999),
}
BATCH_SIZES = (3, 8)


def ort_session(model: Path, threads: int = 2) -> object:
    """A CPU session loaded *by path*, so external data next to the model is found."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def run_padded(
    session: object, seqs: Sequence[Sequence[int]], pad_id: int, side: str
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``seqs`` as one batch padded on ``side``; returns (embeddings, norms)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    emb, norm = session.run(None, {"input_ids": ids, "attention_mask": mask})  # type: ignore[attr-defined]
    return np.asarray(emb, dtype=np.float64), np.asarray(norm, dtype=np.float64)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.asarray((a * b).sum(-1) / np.maximum(den, 1e-30))


def measure(
    session: object, reference: Reference, seqs: Sequence[Sequence[int]], pad_id: int
) -> dict[str, float | int]:
    """All grid metrics (no judgement); NaN/inf anywhere shows up as ``finite = 0``."""
    ref = reference.encode(seqs)
    alone = [run_padded(session, [s], pad_id, "right") for s in seqs]
    emb_alone = np.concatenate([a[0] for a in alone])
    norm_alone = np.concatenate([a[1] for a in alone])
    outputs, batch_cos, side_cos = [emb_alone], [], []
    norm_err = [np.abs(norm_alone - ref.norms) / np.maximum(ref.norms, 1e-30)]
    refs = [ref.embeddings]
    runs = len(seqs)
    for size in BATCH_SIZES:
        for start in range(0, len(seqs), size):
            idx = list(range(start, min(start + size, len(seqs))))
            # Pad a short tail batch with the longest sequences so every batch has neighbours.
            while len(idx) < min(size, len(seqs)):
                idx.append(int(np.argmax([len(s) for s in seqs])))
            sides = {
                side: run_padded(session, [seqs[i] for i in idx], pad_id, side) for side in ("left", "right")
            }
            runs += 2
            for emb, norm in sides.values():
                outputs.append(emb)
                refs.append(ref.embeddings[idx])
                batch_cos.append(_cos(emb, emb_alone[idx]))
                norm_err.append(np.abs(norm - ref.norms[idx]) / np.maximum(ref.norms[idx], 1e-30))
            side_cos.append(_cos(sides["left"][0], sides["right"][0]))
    got, want = np.concatenate(outputs), np.concatenate(refs)
    alone_cos = np.nan_to_num(_cos(emb_alone, ref.embeddings), nan=-1.0)
    finite = bool(np.isfinite(got).all()) and all(np.isfinite(n).all() for n in norm_err)
    return {
        "finite": int(finite),
        "max_abs": float(np.nan_to_num(np.abs(got - want), nan=np.inf).max()),
        "min_cos": float(np.nan_to_num(_cos(got, want), nan=-1.0).min()),
        "mean_cos": float(np.nan_to_num(_cos(got, want), nan=-1.0).mean()),
        "alone_min_cos": float(alone_cos.min()),
        "batch_min_cos": float(np.nan_to_num(np.concatenate(batch_cos), nan=-1.0).min()),
        "padding_side_min_cos": float(np.nan_to_num(np.concatenate(side_cos), nan=-1.0).min()),
        "norm_max_rel_err": float(np.nan_to_num(np.concatenate(norm_err), nan=np.inf).max()),
        "max_abs_residual": ref.max_abs_residual,
        "sequences": len(seqs),
        "max_length": max(len(s) for s in seqs),
        "ort_runs": runs,
    }


def measure_torch(
    module: Any, reference: Reference, seqs: Sequence[Sequence[int]], pad_id: int
) -> dict[str, float]:
    """fp16 *numerics* check on the exported PyTorch module, right-padded batches of 8.

    ONNX Runtime's CPU EP has no fp16 kernels for most ops: it inserts casts and then removes
    the fp32→fp16→fp32 pairs, so an fp16 graph that overflows on a GPU runs clean on CPU (the
    naive-fp16 overflow stress model does exactly that). PyTorch's CPU fp16 rounds every op to
    fp16 like a GPU does, so it is the check that can see overflow here. On a GPU host, the
    CUDA/TensorRT EP run is the authoritative one.
    """
    import torch

    ref = reference.encode(seqs)
    got = []
    for start in range(0, len(seqs), 8):
        chunk = seqs[start : start + 8]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(list(seq))
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            got.append(module(ids, mask)[0].double().numpy())
    emb = np.concatenate(got)
    return {
        "torch_fp16_finite": float(np.isfinite(emb).all()),
        "torch_fp16_min_cos": float(np.nan_to_num(_cos(emb, ref.embeddings), nan=-1.0).min()),
    }


def gate_torch(metrics: dict[str, float], precision: Precision) -> None:
    """Judge :func:`measure_torch`'s numbers with the precision's cosine tolerance."""
    tol = TOLERANCES[precision]
    if not metrics["torch_fp16_finite"] or metrics["torch_fp16_min_cos"] <= tol.min_cos:
        raise ValidationFailed(
            f"{precision} numerics failed in PyTorch fp16 (what a GPU computes): "
            f"finite={bool(metrics['torch_fp16_finite'])}, min cosine to the reference "
            f"{metrics['torch_fp16_min_cos']:.6f} ≤ {tol.min_cos} — overflow in the residual stream?"
        )


def gate(
    metrics: dict[str, float | int], precision: Precision, batch_invariant: bool = True
) -> dict[str, float | int | str | bool]:
    """Judge ``metrics`` against the precision's tolerance; raise :class:`ValidationFailed`.

    A graph marked ``batch_invariant=False`` (int8 dynamic) is served one text per run, never
    padded, so it is judged on the unpadded runs; its batched numbers are recorded, not gated.
    """
    tol = TOLERANCES[precision]
    failures = []
    judged = dict(metrics)
    if not batch_invariant:
        judged.update(min_cos=metrics["alone_min_cos"], batch_min_cos=1.0)
    if not judged["finite"]:
        failures.append("outputs contain NaN or inf")
    if tol.max_abs is not None and judged["max_abs"] >= tol.max_abs:
        failures.append(f"max abs error {judged['max_abs']:.3g} ≥ {tol.max_abs:g}")
    if judged["min_cos"] <= tol.min_cos:
        failures.append(f"min cosine to the reference {judged['min_cos']:.6f} ≤ {tol.min_cos}")
    if judged["batch_min_cos"] <= tol.min_batch_cos:
        failures.append(
            f"batch invariance: min cosine alone vs batched {judged['batch_min_cos']:.6f} "
            f"≤ {tol.min_batch_cos}"
        )
    if failures:
        raise ValidationFailed(
            f"{precision} graph failed validation against the reference: " + "; ".join(failures)
        )
    result: dict[str, float | int | str | bool] = dict(metrics)  # measured, not judged
    result.update(
        passed=True,
        tolerance_max_abs=tol.max_abs or 0.0,
        tolerance_min_cos=tol.min_cos,
        tolerance_batch_min_cos=tol.min_batch_cos,
        gated_min_cos=judged[
            "min_cos"
        ],  # what the tolerance was applied to (≠ min_cos when not batch invariant)
        gated_on="unpadded runs (served one text per run)" if not batch_invariant else "all runs",
    )
    log.info(
        "validation passed: max_abs %.2e, min cos %.7f, batch min cos %.7f over %d sequences",
        metrics["max_abs"],
        judged["min_cos"],
        judged["batch_min_cos"],
        metrics["sequences"],
    )
    return result
