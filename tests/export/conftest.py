"""Fixtures shared by the export tests beyond the session-wide bundles of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_plain_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 exported plain: the input of the BERT graph passes and the int8 quantisers."""
    from export.assets import minilm_dir
    from export.checkpoint import load_checkpoint
    from export.embedder import build_embedder
    from export.to_onnx import export_onnx

    ckpt = load_checkpoint(minilm_dir())
    path = tmp_path_factory.mktemp("minilm-plain") / "model.onnx"
    export_onnx(build_embedder(ckpt), path, pad_id=ckpt.pad_id, vocab_size=ckpt.vocab_size)
    return path
