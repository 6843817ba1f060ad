"""int8 routes for the CPU: dynamic (fast, served one text per call) and static QDQ (fixed scales).

Why two: ``quantize_dynamic`` makes ONNX Runtime use its AMX/VNNI QGEMM kernels
(DynamicQuantizeMatMul / MatMulIntegerToFloat), the fastest CPU path measured (≈ 4–5× PyTorch
fp32 one text per run), but its activation scale is one number over the whole ``[B, S, H]``
tensor, so a text's vector depends on its batch neighbours and on padding. Run one unpadded text
per ``session.run`` (the service does so for ``batch_invariant: false`` bundles) and nothing
else can move that scale: invariant by construction. Static QDQ freezes every activation scale
at calibration time, so it is invariant inside a padded batch too, and TensorRT consumes QDQ
graphs directly; on ORT CPU it is slower (see docs/benchmarks.md for the measured trade-off).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from export.passes._graph import PassError, op_counts

Batch = tuple[np.ndarray, np.ndarray]  # (input_ids, attention_mask), int64 [B, S]


def quantize_dynamic_int8(src: Path, dst: Path, *, per_channel: bool = False) -> Counter[str]:
    """W8A8 dynamic quantisation of every MatMul with a constant weight; returns dst's op counts.

    Per-tensor weights by default: measured as fast as or faster than per-channel at equal cosine.
    Raises ``PassError`` if nothing was quantised (ORT's quantisers fail silently on some graphs).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        op_types_to_quantize=["MatMul"],
        use_external_data_format=_has_external_data(src),
    )
    counts = op_counts(onnx.load(str(dst), load_external_data=False))
    if counts["MatMulInteger"] + counts["DynamicQuantizeMatMul"] == 0:
        raise PassError(f"quantize_dynamic left {dst.name} without any integer MatMul")
    return counts


class _Reader:
    """ORT CalibrationDataReader over fixed (ids, mask) batches."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self._batches = list(batches)
        self._it: Iterator[Batch] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        if item is None:
            return None
        ids, mask = item
        return {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}

    def rewind(self) -> None:
        """Some calibrators (entropy, percentile) read the data more than once."""
        self._it = iter(self._batches)


def quantize_static_qdq(src: Path, dst: Path, calibration: Iterable[Batch]) -> Counter[str]:
    """Static int8 QDQ (symmetric activations, per-channel weights) calibrated on ``calibration``.

    Batch-invariant by construction: every activation scale is a constant in the graph. Only
    MatMuls are quantised so attention, norms and pooling stay fp32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        src,
        dst,
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=_has_external_data(src),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    counts = op_counts(onnx.load(str(dst), load_external_data=False))
    if counts["QuantizeLinear"] == 0:
        raise PassError(f"quantize_static left {dst.name} without QDQ nodes")
    return counts


def _has_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
