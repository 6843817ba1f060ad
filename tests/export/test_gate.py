"""The validation gate can fail: a causal graph, first-token pooling and naive fp16 on the
overflow stress model are all refused, and a refused export leaves nothing at --out."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.api import export_bundle
from export.assets import build_tiny_qwen2
from export.checkpoint import load_checkpoint
from export.corpus import CorpusTokenizer, validation_sequences
from export.errors import ValidationFailed
from export.reference import Reference


def _nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging left behind"


def test_causal_graph_fails_the_gate(tiny_qwen2_checkpoint: Path, tmp_path: Path) -> None:
    # graph="plain": the chunked pass rebuilds the mask as key-padding-only, which would (rightly)
    # turn even a causal export bidirectional; the plain exporter graph keeps what torch traced.
    out = tmp_path / "causal"
    with pytest.raises(ValidationFailed, match="max abs error"):
        export_bundle(
            tiny_qwen2_checkpoint, out, "fp32", debug_causal=True, graph="plain", validation_max_length=16
        )
    _nothing_left(out)


def test_first_token_pooling_fails_the_gate(tiny_qwen2_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cls"
    with pytest.raises(ValidationFailed, match="min cosine"):
        export_bundle(tiny_qwen2_checkpoint, out, "fp32", debug_pooling="cls", validation_max_length=16)
    _nothing_left(out)


@pytest.fixture(scope="module")
def stress_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Qwen2 whose residual stream reaches ~1e5 (> fp16's 65504) after 4 layers."""
    return build_tiny_qwen2(
        tmp_path_factory.mktemp("stress") / "ckpt", num_layers=4, massive_activation=25000.0
    )


def test_stress_model_really_overflows_fp16(stress_checkpoint: Path) -> None:
    ckpt = load_checkpoint(stress_checkpoint)
    seqs = validation_sequences(CorpusTokenizer(ckpt), ckpt.prompts, 16)
    out = Reference("qwen2", ckpt.config, ckpt.weight_files, ckpt.pooling).encode(seqs)
    assert out.max_abs_residual > 65504
    # … and the texts stay distinguishable, so "cosine > 0.999" below is not trivially true.
    assert (out.embeddings @ out.embeddings.T).min() < 0.9


def test_naive_fp16_fails_on_stress_model(stress_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "naive"
    with pytest.raises(ValidationFailed, match="finite=False"):
        export_bundle(stress_checkpoint, out, "fp16", fp16_mode="naive", validation_max_length=16)
    _nothing_left(out)


def test_mixed_fp16_survives_stress_model(stress_checkpoint: Path, tmp_path: Path) -> None:
    manifest = export_bundle(stress_checkpoint, tmp_path / "mixed", "fp16", validation_max_length=16)
    v = manifest.validation
    assert float(v["max_abs_residual"]) > 65504
    assert float(v["torch_fp16_min_cos"]) > 0.999 and float(v["min_cos"]) > 0.999
