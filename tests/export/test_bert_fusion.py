"""The BERT fp32 default graph is ``ort-fused`` (com.microsoft.Attention): recorded in the manifest,
within the fp32 gate, and still batch-neighbour invariant."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from export_helpers import BundleRunner

from bundle import Manifest, load_manifest

TEXTS = ["Hello, world!", "a", "The quick brown fox jumps over the lazy dog. " * 6, "你好，世界！", "x " * 40]


def test_minilm_fp32_default_is_ort_fused(minilm_bundle: Path) -> None:
    manifest = load_manifest(minilm_bundle)
    assert manifest.graph.variant == "ort-fused"
    model = onnx.load(str(minilm_bundle / manifest.graph.file), load_external_data=False)
    ops = Counter((n.domain, n.op_type) for n in model.graph.node)
    assert manifest.shape is not None
    assert ops[("com.microsoft", "Attention")] == manifest.shape.num_layers  # one per layer
    assert ops[("", "Softmax")] == 0  # no unfused attention left
    assert float(manifest.validation["max_abs"]) < 1e-4  # the fp32 gate held


def test_ort_fused_keeps_batch_neighbour_invariance(minilm_bundle: Path) -> None:
    """A text's vector alone and inside a padded batch (either side) agree to float rounding:
    measured ≤ 3e-8 for right padding (how the service pads) and ≤ 1e-7 for left padding, the same
    as the plain graph (GEMM blocking and the masked keys' summation order change with the batch)."""
    runner = BundleRunner(minilm_bundle)
    seqs = [runner.ids(t) for t in TEXTS]
    alone = np.concatenate([runner.run([s])[0] for s in seqs])
    for side in ("right", "left"):
        assert np.abs(runner.run(seqs, side)[0] - alone).max() <= 1e-6


def test_manifest_without_graph_variant_still_loads(minilm_bundle: Path) -> None:
    """Bundles written before the field existed load, with the variant unknown (None)."""
    raw = json.loads((minilm_bundle / "manifest.json").read_text())
    del raw["graph"]["variant"]
    assert Manifest.model_validate(raw).graph.variant is None


def test_attention_core_fusion_keeps_the_projections_quantisable(
    minilm_plain_graph: Path, tmp_path: Path
) -> None:
    """The int8 form of ``ort-fused``: one MultiHeadAttention per layer reading the Q/K/V MatMuls
    (weights still initializers, so the quantisers see all 36 projections), same vectors as the
    plain graph for either padding side."""
    from export.passes import apply_graph_variant
    from export.quantize import weight_matmuls
    from export.validate import ort_session, run_padded

    out = tmp_path / "core.onnx"
    report = apply_graph_variant(minilm_plain_graph, "ort-fused", num_heads=12, out=out, quantizable=True)
    assert report.ops["MultiHeadAttention"] == 6 and report.ops.get("Attention", 0) == 0
    model = onnx.load(str(out))
    assert Counter(n.op_type for n in model.graph.node)["Softmax"] == 0
    assert weight_matmuls(model) == 36
    producers = {o: n for n in model.graph.node for o in n.output}
    for mha in (n for n in model.graph.node if n.op_type == "MultiHeadAttention"):
        assert [producers[i].op_type for i in mha.input[:3]] == ["MatMul"] * 3
        assert len({producers[i].input[0] for i in mha.input[:3]}) == 1  # self-attention: one x
    rng = np.random.default_rng(0)
    seqs = [[101, *rng.integers(1000, 29000, n).tolist(), 102] for n in (3, 40, 17)]
    plain, core = ort_session(minilm_plain_graph, 1), ort_session(out, 1)
    for side in ("right", "left"):
        want, got = run_padded(plain, seqs, 0, side)[0], run_padded(core, seqs, 0, side)[0]
        assert np.abs(got - want).max() <= 1e-5
