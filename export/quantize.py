"""int8: the one quantisation module. Exports, benchmarks and tests all call :func:`quantize`.

Four methods for different consumers, each checked for the ops it must contain:

* ``dynamic`` — ``quantize_dynamic`` on MatMul (W8A8, MatMulInteger, per-channel weights).
  Fast on CPU, but its activation scale is one number per tensor *over the whole batch*,
  padding included, so a text's vector depends on its neighbours. The bundle says so
  (``batch_invariant = False``) and the service runs such bundles one text per run.
* ``per-token`` (default) — W8A8 with one activation scale per row (token) after SmoothQuant
  channel smoothing calibrated on text, see :mod:`export.per_token_int8`: a row's scale depends
  only on that row, so the same text gives the same vector alone or in a padded batch. Batch
  invariant; served batched like fp32.
* ``weight-only`` — ``MatMulNBits`` with 8-bit blocks (QOperator format), fp32 compute. Batch
  invariant, runs on the CPU and CUDA EPs, about fp32 speed on CPU.
* ``qdq`` — static ``QuantizeLinear/DequantizeLinear`` (symmetric, per-channel weights, scales
  calibrated on caller-supplied feeds): the explicit-quantisation format TensorRT consumes.
  Static scales do not depend on the batch, so it is batch invariant.

Pitfall this module guards against: ``MatMulNBits`` with ``QuantFormat.QDQ`` and 8 bits logs an
error per node and returns the model *unquantised*. Every result is therefore checked by
counting ops, and a graph without the expected ops raises :class:`QuantizationError`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export.errors import QuantizationError

log = logging.getLogger(__name__)
Int8Method = Literal["dynamic", "per-token", "weight-only", "qdq"]
INT8_METHODS: tuple[Int8Method, ...] = ("dynamic", "per-token", "weight-only", "qdq")
Feed = dict[str, np.ndarray]
# The op each method's quantised projections become (the op-count check looks for these).
_QUANTISED_OPS: dict[Int8Method, tuple[str, ...]] = {
    "dynamic": ("MatMulInteger", "DynamicQuantizeLinear"),
    "per-token": ("MatMulIntegerToFloat",),
    "weight-only": ("MatMulNBits",),
    "qdq": ("QuantizeLinear", "DequantizeLinear"),
}


@dataclass(frozen=True)
class Quantized:
    external_data: list[str]
    batch_invariant: bool
    checks: dict[str, float | int | str | bool]


def weight_matmuls(model: Any) -> int:
    """MatMul nodes whose second input is an initializer: the projections to quantise."""
    inits = {i.name for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def verify_ops(
    path: Path, method: Int8Method, expected: int, keep_float: int = 0
) -> dict[str, float | int | str | bool]:
    """Check the graph holds ``expected`` quantised projections and exactly ``keep_float`` float ones."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    left = weight_matmuls(model)
    need = _QUANTISED_OPS[method]
    counts = {op: ops.get(op, 0) for op in need}
    ok = left == keep_float and counts[need[0]] >= expected
    if method != "qdq":
        ok = ok and counts[need[0]] == expected
    else:  # every projection's weight must come out of a DequantizeLinear
        dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        fed = sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq_outputs)
        ok = ok and fed == expected
        counts["MatMul_from_DequantizeLinear"] = fed
    if not ok:
        raise QuantizationError(
            f"int8 {method}: expected {expected} quantised projections ({'/'.join(need)}) and {keep_float} "
            f"float ones, found {counts} and {left} float MatMul(s) with weight initializers — the model "
            "was not (fully) quantised"
        )
    return {
        "int8_method": method,
        "quantized_matmuls": expected,
        "float_matmuls": keep_float,
        **{f"ops_{k}": v for k, v in counts.items()},
    }


class CalibrationReader:
    """ORT ``CalibrationDataReader`` over fixed feeds; rewinds for calibrators that read twice
    (entropy, percentile)."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = [
            {name: np.asarray(value, dtype=np.int64) for name, value in feed.items()} for feed in feeds
        ]
        self._it: Iterator[Feed] = iter(self._feeds)

    def get_next(self) -> Feed | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def calibration_feeds(seqs: Sequence[Sequence[int]]) -> list[Feed]:
    """One unpadded run per sequence, for static activation scales.

    Callers pass token ids they already have (the export: its validation-like corpus drawn with a
    *different* seed from the gate's; benchmarks: their own inputs). Static per-tensor scales clip
    whatever the calibration never saw (texts alone gave min cosine 0.957 on the tiny model; with
    random ids as well, 0.9997). Real deployments should calibrate on representative traffic.
    """
    return [
        {"input_ids": np.array([s], dtype=np.int64), "attention_mask": np.ones((1, len(s)), dtype=np.int64)}
        for s in seqs
    ]


def _targets(src: Path, method: Int8Method) -> tuple[list[str], list[str]]:
    """(projections to quantise, projections kept float) by node name."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    dims = {i.name: tuple(i.dims) for i in graph.initializer}
    # Only the projections: quantising QK^T / PV too costs accuracy and is not what TRT needs.
    projections = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in dims]
    # Per-tensor W8A8 methods keep the MLP down-projections (weight [intermediate, hidden]: K > N)
    # in float: their input is the GELU/SwiGLU output, whose outlier channels one int8 scale for
    # the whole tensor cannot cover. Measured on all-MiniLM-L6-v2: quantising them drops min
    # cosine to 0.89 (per-tensor) / 0.98 (per-channel); keeping them float gives 0.990+. A
    # per-token scale covers each row's own outliers (min cosine 0.994 with every projection
    # int8), and weight-only keeps activations in float, so both quantise every projection.
    down = [
        n.name
        for n in projections
        if len(dims[n.input[1]]) == 2 and dims[n.input[1]][0] > dims[n.input[1]][1]
    ]
    keep_float = down if method in ("dynamic", "qdq") else []
    return [n.name for n in projections if n.name not in keep_float], keep_float


def quantize(
    src: Path,
    dst: Path,
    method: Int8Method,
    calibration: Sequence[Feed] = (),
    *,
    external_data: str = "auto",
) -> Quantized:
    """Quantise the fp32 graph ``src`` into ``dst`` with ``method`` and verify the result's ops.

    ``calibration`` (see :func:`calibration_feeds`) is required for ``qdq``; for ``per-token`` it
    turns on smoothing (the export always passes it); other methods ignore it.
    """
    if method not in _QUANTISED_OPS:
        raise QuantizationError(f"unknown int8 method {method!r}; choose {', '.join(INT8_METHODS)}")
    if method == "qdq" and not calibration:
        raise QuantizationError("int8 qdq needs calibration feeds")
    targets, keep_float = _targets(src, method)
    big = sum(p.stat().st_size for p in src.parent.iterdir()) > 2 * 1024**3
    use_ext = external_data == "always" or (external_data == "auto" and big)
    log.info("int8 %s: quantising %d projections", method, len(targets))
    _run(src, dst, method, targets, calibration, use_ext)
    checks = verify_ops(dst, method, len(targets), len(keep_float))
    files = sorted(p.name for p in dst.parent.iterdir() if p.is_file() and p.name.startswith(dst.name + "."))
    return Quantized(files, batch_invariant=method != "dynamic", checks=checks)


def channel_max(src: Path, calibration: Sequence[Feed], targets: list[str]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each target MatMul's input over the calibration runs (fp32 graph),
    for per-token smoothing. The probe graph is written next to ``src`` so external data resolves."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src), load_external_data=False)
    wanted = set(targets)
    inputs = sorted({n.input[0] for n in model.graph.node if n.name in wanted})
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in inputs
    )
    probe = src.parent / f".{src.name}.probe"
    onnx.save(model, str(probe))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        result = {x: np.zeros(0, np.float32) for x in inputs}
        for feed in calibration:
            ints = {name: np.asarray(v, dtype=np.int64) for name, v in feed.items()}
            for x, value in zip(inputs, session.run(inputs, ints), strict=True):
                rows = np.abs(np.asarray(value)).reshape(-1, value.shape[-1]).max(axis=0)
                result[x] = rows if result[x].size == 0 else np.maximum(result[x], rows)
        return result
    finally:
        probe.unlink(missing_ok=True)


def _run(
    src: Path, dst: Path, method: Int8Method, targets: list[str], calibration: Sequence[Feed], use_ext: bool
) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if method == "dynamic":
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=targets,
            use_external_data_format=use_ext,
        )
    elif method == "per-token":
        from export.per_token_int8 import quantize_per_token

        amax = channel_max(src, calibration, targets) if calibration else None
        model = onnx.load(str(src))
        quantize_per_token(model, set(targets), amax)
        onnx.save(model, str(dst), save_as_external_data=use_ext, location=dst.name + ".data")
    elif method == "weight-only":
        config = DefaultWeightOnlyQuantConfig(
            block_size=128, is_symmetric=True, accuracy_level=None, quant_format=QuantFormat.QOperator, bits=8
        )
        quantizer = MatMulNBitsQuantizer(str(src), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_ext)
    else:
        quantize_static(
            src,
            dst,
            CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=targets,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=use_ext,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
