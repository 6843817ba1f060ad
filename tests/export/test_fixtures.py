"""The shared fixtures produce loadable, verified bundles for both families."""

from __future__ import annotations

from pathlib import Path

from bundle import load_manifest, verify_files


def test_tiny_qwen2_bundle_is_complete(tiny_qwen2_bundle: Path) -> None:
    manifest = load_manifest(tiny_qwen2_bundle)
    verify_files(tiny_qwen2_bundle, manifest)
    assert manifest.family == "qwen2" and manifest.pooling == "last_token"
    assert manifest.graph.external_data == ["model.onnx.data"]
    assert manifest.tokenizer.suffix_ids == [151643] and manifest.tokenizer.prefix_ids == []
    assert manifest.validation["passed"] is True


def test_minilm_bundle_is_complete(minilm_bundle: Path) -> None:
    manifest = load_manifest(minilm_bundle)
    verify_files(minilm_bundle, manifest)
    assert manifest.family == "bert" and manifest.pooling == "mean" and manifest.dim == 384
    assert manifest.tokenizer.prefix_ids == [101] and manifest.tokenizer.suffix_ids == [102]
    assert manifest.prompts.query_template is None
    assert manifest.max_input_tokens == 256
