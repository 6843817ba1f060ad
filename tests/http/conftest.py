"""Fixtures for tests/http: an API keys file and a test PKI (helpers live in http_stack.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from http_pki import Pki, make_pki
from http_stack import KEY, OLD_KEY


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# rotation: both keys are valid\n{OLD_KEY}\n{KEY}\n")
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
