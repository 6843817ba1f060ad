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
