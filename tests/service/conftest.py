"""Fixtures for the service tests: the toy bundle, fake runtimes and an in-process server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from svc_toy import FakeRuntime, build_toy_bundle, embedding_table, toy_tokenizer


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_bundle(tmp_path_factory.mktemp("toy") / "toy-bundle")


@pytest.fixture(scope="session")
def toy_table() -> np.ndarray:
    return embedding_table(toy_tokenizer().get_vocab_size())


@pytest.fixture
def fake_runtime(toy_table: np.ndarray) -> FakeRuntime:
    return FakeRuntime(toy_table)
