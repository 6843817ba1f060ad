"""Fixtures for the client tests: the reliability toy bundle and its in-process servers.

The harnesses are the reliability suite's (``rel_harness``: an in-process server on a real
port, on its own loop so the synchronous client can call it) and the HTTP suite's PKI and keys;
their folders go on ``sys.path`` the way pytest's rootdir-less imports would put them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
for folder in ("reliability", "http"):
    if str(TESTS / folder) not in sys.path:
        sys.path.insert(0, str(TESTS / folder))

from http_pki import Pki, make_pki  # noqa: E402
from http_stack import KEY  # noqa: E402
from rel_harness import Live, ThreadedServer  # noqa: E402
from rel_toy import build_toy_bundle  # noqa: E402


@pytest.fixture(scope="session")
def client_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_bundle(tmp_path_factory.mktemp("client") / "toy")


@pytest.fixture(scope="module")
def live(client_bundle: Path) -> Iterator[Live]:
    """One plain server (no keys, no TLS) shared by a module's tests."""
    with ThreadedServer(client_bundle, max_batch_wait_ms=1.0) as running:
        yield running


@pytest.fixture(scope="session")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("client-pki"))


@pytest.fixture(scope="session")
def client_keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client-keys") / "api-keys"
    path.write_text(f"{KEY}\n")
    return path
