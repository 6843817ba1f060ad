"""Fixtures for the reliability tests: toy bundles built in milliseconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rel_toy import build_toy_bundle


@pytest.fixture(scope="session")
def rel_toy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only: tests that tamper with a bundle use :func:`toy_copy`."""
    return build_toy_bundle(tmp_path_factory.mktemp("rel") / "toy")


@pytest.fixture
def toy_copy(rel_toy_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the toy bundle, free to tamper with."""
    return Path(shutil.copytree(rel_toy_bundle, tmp_path / "bundle"))
