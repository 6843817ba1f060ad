"""The ``ort-chunked`` qwen2 graph: attention on ORT's flash MultiHeadAttention, padding folded into K.

Parity is against the previous default (``chunked``: opset-23 Attention with a key-padding mask),
on left- and right-padded batches, short and long; batch invariance and "padding has exactly no
weight" are checked on the graph itself; the node pattern proves the flash path's preconditions
(MHA without mask/bias inputs, no head transposes, no S² value).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.passes import PassError, apply_graph_variant, op_counts
from tests.perf.conftest import copy_graph, export_tiny, padded_batch, session, square_values


@pytest.fixture(scope="module")
def opset23(tiny_qwen2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tiny_qwen2_checkpoint, tmp_path_factory.mktemp("mha") / "opset23", 23)


@pytest.fixture(scope="module")
def old(opset23: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = copy_graph(opset23, tmp_path_factory.mktemp("old"))
    apply_graph_variant(path, "chunked", query_chunk=384, mlp_chunk=640)
    return path


@pytest.fixture(scope="module")
def new(opset23: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = copy_graph(opset23, tmp_path_factory.mktemp("new"))
    # Small query blocks: 2k–4k tokens run many Loop iterations with a ragged last block.
    report = apply_graph_variant(path, "ort-chunked", query_chunk=384, mlp_chunk=640)
    assert report.variant == "ort-chunked"
    assert report.attention_query_chunk == 384 and report.mlp_chunk == 640
    assert report.ops["MultiHeadAttention"] == 2 and report.ops.get("Attention", 0) == 0
    return path


def _run(path: Path, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    return list(session(path).run(None, {"input_ids": ids, "attention_mask": mask}))  # type: ignore[attr-defined]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lengths", [[5, 37, 64, 1, 50], [2500, 900]], ids=["short", "long"])
def test_matches_the_chunked_graph(old: Path, new: Path, side: str, lengths: list[int]) -> None:
    ids, mask = padded_batch(lengths, side, seed=1)
    reference, ours = _run(old, ids, mask), _run(new, ids, mask)
    assert np.abs(reference[0] - ours[0]).max() <= 1e-6
    assert np.allclose(reference[1], ours[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_invariant(new: Path, side: str) -> None:
    lengths = [7, 300, 41]
    ids, mask = padded_batch(lengths, side, seed=2)
    batched = _run(new, ids, mask)[0]
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(ids.shape[1] - n, None)
        alone = _run(new, ids[row : row + 1, cols], mask[row : row + 1, cols])[0]
        assert np.abs(alone[0] - batched[row]).max() <= 1e-6


def test_padding_has_exactly_zero_weight(new: Path) -> None:
    """Whatever sits under the padding (here random tokens instead of the pad id) changes nothing.

    4200 left pads before 300 tokens: on a 2 MiB L2 the flash kernel's first key block (≈ 3971
    keys for 17-wide heads) is all padding, so its online-softmax rescale has to zero it out."""
    ids, mask = padded_batch([4500, 300], "left", seed=3)
    garbage = ids.copy()
    garbage[mask == 0] = np.random.default_rng(4).integers(0, 151646, int((mask == 0).sum()))
    clean, noisy = _run(new, ids, mask)[0], _run(new, garbage, mask)[0]
    assert np.array_equal(clean, noisy)
    alone = _run(new, ids[1:, -300:], mask[1:, -300:])[0]
    assert np.abs(alone[0] - clean[1]).max() <= 1e-6


def test_node_pattern_takes_the_flash_path(new: Path) -> None:
    model = onnx.load(str(new), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}.get("com.microsoft") == 1
    top = op_counts(model, include_subgraphs=False)
    assert top["Loop"] == 4 and top.get("Attention", 0) == 0  # 2 attention + 2 MLP loops
    assert top["RotaryEmbedding"] == 4 and top.get("Transpose", 0) == 4  # only the Loops' own transposes
    mhas = [
        n
        for loop in model.graph.node
        if loop.op_type == "Loop"
        for n in loop.attribute[0].g.node
        if n.op_type == "MultiHeadAttention"
    ]
    assert len(mhas) == 2
    for node in mhas:
        # flash preconditions (multihead_attention.cc): no bias, key_padding_mask, attention_bias, past
        assert node.domain == "com.microsoft" and len(node.input) == 3
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == 4 and attrs["scale"] == pytest.approx(0.25)  # 1/sqrt(16), not 1/sqrt(17)
        assert "unidirectional" not in attrs


def test_no_square_intermediate(new: Path, tmp_path: Path) -> None:
    assert square_values(new, tmp_path / "probe.onnx") == []


def test_refuses_a_causal_graph(opset23: Path, tmp_path: Path) -> None:
    model = onnx.load(str(opset23))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Attention" and attr.name == "is_causal":
                attr.i = 1
    causal = tmp_path / "causal.onnx"
    onnx.save(model, str(causal))
    with pytest.raises(PassError, match="causal"):
        apply_graph_variant(causal, "ort-chunked", out=tmp_path / "x.onnx")


def test_needs_the_opset23_export(tiny_qwen2_checkpoint: Path, tmp_path: Path) -> None:
    plain = export_tiny(tiny_qwen2_checkpoint, tmp_path / "plain", 20)
    with pytest.raises(PassError, match="opset-23"):
        apply_graph_variant(plain, "ort-chunked", out=tmp_path / "x.onnx")


def test_fp32_bundle_defaults_to_ort_chunked(tiny_qwen2_bundle: Path) -> None:
    """The export gate (fp32 max abs < 1e-4 to the reference, batch invariance) passed on it."""
    from bundle import load_manifest

    graph = load_manifest(tiny_qwen2_bundle).graph
    assert graph.variant == "ort-chunked"
    assert graph.attention_query_chunk is not None and graph.mlp_chunk is not None


def test_int8_bundle_defaults_to_ort_chunked(tiny_qwen2_checkpoint: Path, tmp_path: Path) -> None:
    """Per-token int8 quantises the projections around the flash MHA core; the gate (min cos > 0.99,
    batch invariance) passed or export_bundle would have raised. QDQ (TensorRT's format) keeps the
    graph free of ORT contrib ops."""
    from bundle import load_manifest
    from export.api import export_bundle

    export_bundle(tiny_qwen2_checkpoint, tmp_path / "pt", "int8", validation_max_length=32)
    manifest = load_manifest(tmp_path / "pt")
    assert manifest.graph.variant == "ort-chunked" and manifest.batch_invariant
    ops = op_counts(onnx.load(str(tmp_path / "pt" / manifest.graph.file), load_external_data=False))
    assert ops["MultiHeadAttention"] == 2 and ops["MatMulIntegerToFloat"] == 14 and ops.get("MatMul", 0) == 0

    export_bundle(
        tiny_qwen2_checkpoint, tmp_path / "qdq", "int8", int8_method="qdq", validation_max_length=32
    )
    assert load_manifest(tmp_path / "qdq").graph.variant == "chunked"
