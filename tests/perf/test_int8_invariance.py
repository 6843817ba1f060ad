"""The served int8 route (dynamic int8, one unpadded text per run) is batch-invariant; static QDQ is
invariant inside a padded batch. Both stay close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.passes import apply_graph_variant
from export.quantize import CalibrationReader, quantize
from tests.perf.conftest import padded_batch, session


@pytest.fixture(scope="module")
def base(opset23_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "base.onnx"
    apply_graph_variant(opset23_onnx, "chunked", mlp_chunk=None, out=out)
    return out


def _vectors(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(session(path).run(None, {"input_ids": ids, "attention_mask": mask})[0])  # type: ignore[attr-defined]


def _alone(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rows = [ids[r : r + 1, mask[r] == 1] for r in range(len(ids))]
    return np.concatenate([_vectors(path, row, np.ones_like(row)) for row in rows])


def test_dynamic_int8_served_per_text_is_invariant(base: Path, tmp_path: Path) -> None:
    q = tmp_path / "dyn.onnx"
    checks = quantize(base, q, "dynamic").checks
    assert int(checks["ops_MatMulInteger"]) > 0
    ids, mask = padded_batch([12, 60, 33], "right", seed=4)
    # Served route: one unpadded text per run — the same text alone or "in a batch" is the same call.
    per_text = _alone(q, ids, mask)
    other_neighbours, other_mask = padded_batch([12, 5, 90], "left", seed=4)
    again = _alone(q, other_neighbours, other_mask)
    assert np.array_equal(per_text[0], again[0])
    fp32 = _alone(base, ids, mask)
    assert (per_text * fp32).sum(-1).min() >= 0.99


def test_static_qdq_is_invariant_inside_a_padded_batch(base: Path, tmp_path: Path) -> None:
    q = tmp_path / "qdq.onnx"
    rng = np.random.default_rng(0)
    calib = [
        {"input_ids": rng.integers(0, 151646, (2, n)), "attention_mask": np.ones((2, n), np.int64)}
        for n in (16, 64)
    ]
    quantize(base, q, "qdq", calib)
    ids, mask = padded_batch([12, 60, 33, 7], "left", seed=5)
    batched, alone = _vectors(q, ids, mask), _alone(q, ids, mask)
    assert (batched * alone).sum(-1).min() >= 0.999
    assert (batched * _vectors(base, ids, mask)).sum(-1).min() >= 0.98


def test_per_token_int8_is_exactly_invariant_inside_a_padded_batch(base: Path, tmp_path: Path) -> None:
    q = tmp_path / "pertoken.onnx"
    result = quantize(base, q, "per-token")
    assert result.batch_invariant
    assert result.checks["quantized_matmuls"] == 14  # 2 layers × (q, k, v, o, gate, up, down)
    for side in ("left", "right"):
        ids, mask = padded_batch([12, 60, 33, 7], side, seed=6)
        batched, alone = _vectors(q, ids, mask), _alone(q, ids, mask)
        assert np.abs(batched - alone).max() <= 1e-6
        assert (batched * _vectors(base, ids, mask)).sum(-1).min() >= 0.999


def test_calibration_reader_rewinds() -> None:
    """Calibrators that read the data twice (entropy, percentile) get the same batches again."""
    batches = [
        {"input_ids": np.ones((1, 3)), "attention_mask": np.ones((1, 3))},
        {"input_ids": np.zeros((2, 4)), "attention_mask": np.ones((2, 4))},
    ]
    reader = CalibrationReader(batches)
    first = [reader.get_next() for _ in range(3)]
    reader.rewind()
    second = [reader.get_next() for _ in range(3)]
    assert first[2] is None and second[2] is None
    for a, b in zip(first[:2], second[:2], strict=True):
        assert a is not None and b is not None
        assert a["input_ids"].shape == b["input_ids"].shape and a["input_ids"].dtype == np.int64
