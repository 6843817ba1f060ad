"""The byte-level HTTP fuzzer (bench/fuzz_http.py), bounded for CI: derandomised, so a CI run is
reproducible; ``python -m bench fuzz_http`` runs it longer with fresh randomness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz_http import Keys, Target, http_requests, target

KEYS = Keys()


@pytest.fixture(scope="module")
def fuzz_target(tiny_qwen2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with target(tiny_qwen2_bundle, tmp_path_factory.mktemp("fuzz"), KEYS) as t:
        yield t
    t.check_log()  # after the server stopped: the whole log, start-up to shutdown


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(request=http_requests(KEYS))
def test_no_5xx_no_death_no_hang(fuzz_target: Target, request: bytes) -> None:
    fuzz_target.check(request)


def test_fuzz_reached_the_app(fuzz_target: Target) -> None:
    """The examples were not all refused at the door: some were embedded, some refused by the app."""
    seen = fuzz_target.statuses
    assert fuzz_target.examples >= 60 and seen["200"] > 0 and seen["401"] > 0 and seen["400"] > 0, seen
