"""Parity of the fused and chunked graphs with the unfused export; structure of the chunked graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.passes import PassError, apply_graph_variant, default_query_chunk, op_counts
from tests.perf.conftest import copy_graph, padded_batch, session, square_values


@pytest.fixture(scope="module")
def fused(opset23_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = copy_graph(opset23_onnx, tmp_path_factory.mktemp("fused"))
    report = apply_graph_variant(path, "fused")
    assert report.gqa_attention_nodes == 2
    return path


@pytest.fixture(scope="module")
def chunked(opset23_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = copy_graph(opset23_onnx, tmp_path_factory.mktemp("chunked"))
    # Small blocks so that 2k–4k tokens run many Loop iterations (and a ragged last block).
    report = apply_graph_variant(path, "chunked", query_chunk=384, mlp_chunk=640)
    assert report.attention_query_chunk == 384 and report.mlp_chunk == 640
    return path


def _run(path: Path, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    return list(session(path).run(None, {"input_ids": ids, "attention_mask": mask}))  # type: ignore[attr-defined]


def test_fused_graph_uses_native_ops_and_no_repeat_kv(fused: Path) -> None:
    model = onnx.load(str(fused), load_external_data=False)
    counts = op_counts(model)
    assert counts["Attention"] == 2 and counts["RotaryEmbedding"] == 4 and counts["RMSNormalization"] == 5
    made_by = {out: node.op_type for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "Attention":  # K from RoPE, V from the head transpose: no repeat_kv copy
            assert (made_by[node.input[1]], made_by[node.input[2]]) == ("RotaryEmbedding", "Transpose")


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_matches_unfused(plain_onnx: Path, fused: Path, side: str) -> None:
    ids, mask = padded_batch([5, 37, 64, 1, 50], side)
    plain, ours = _run(plain_onnx, ids, mask), _run(fused, ids, mask)
    assert np.abs(plain[0] - ours[0]).max() <= 1e-6
    assert np.allclose(plain[1], ours[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_chunked_matches_fused_at_long_lengths(fused: Path, chunked: Path, side: str) -> None:
    ids, mask = padded_batch([2500, 900], side, seed=1)
    reference, ours = _run(fused, ids, mask), _run(chunked, ids, mask)
    assert np.abs(reference[0] - ours[0]).max() <= 1e-6
    alone = _run(chunked, ids[1:, -900:] if side == "left" else ids[1:, :900], np.ones((1, 900), np.int64))
    assert np.abs(alone[0][0] - ours[0][1]).max() <= 1e-6


def test_chunked_matches_unfused_short(plain_onnx: Path, chunked: Path) -> None:
    ids, mask = padded_batch([3, 17, 1], "left", seed=2)
    assert np.abs(_run(plain_onnx, ids, mask)[0] - _run(chunked, ids, mask)[0]).max() <= 1e-6


def test_chunked_graph_has_no_square_intermediate(chunked: Path, tmp_path: Path) -> None:
    """Expose every top-level value as an output and run at S=1000: none may have two axes of S."""
    assert square_values(chunked, tmp_path / "probe.onnx") == []
    counts = op_counts(onnx.load(str(chunked), load_external_data=False), include_subgraphs=False)
    assert counts["Attention"] == 0 and counts["Loop"] == 4  # 2 attention + 2 MLP loops


def test_chunked_needs_the_opset23_export(plain_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(PassError, match="opset-23"):
        apply_graph_variant(plain_onnx, "chunked", out=tmp_path / "x.onnx")


def test_default_query_chunk_bounds_the_score_block() -> None:
    assert default_query_chunk(num_heads=4, max_tokens=32768) == 1024
    assert default_query_chunk(num_heads=28, max_tokens=32768) == 128
    assert default_query_chunk(num_heads=14, max_tokens=8192) == 1024


def test_ort_fused_refuses_a_graph_without_bert_attention(plain_onnx: Path, tmp_path: Path) -> None:
    """The Qwen2 graph has no BERT attention pattern: the variant is refused, not silently plain."""
    with pytest.raises(PassError, match="no BERT self-attention"):
        apply_graph_variant(plain_onnx, "ort-fused", num_heads=4, out=tmp_path / "x.onnx")
