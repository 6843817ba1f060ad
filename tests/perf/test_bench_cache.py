"""The cache scenario's query stream (bench/cache_bench.py): Zipf-shaped and reproducible."""

from __future__ import annotations

from collections import Counter

from bench.cache_bench import zipf_stream


def test_zipf_stream_is_heavy_headed_and_seeded() -> None:
    universe = [f"q{k}" for k in range(1000)]
    stream = zipf_stream(universe, 20_000, 1.1, seed=0)
    assert stream == zipf_stream(universe, 20_000, 1.1, seed=0)
    assert all(len(request) == 1 for request in stream)
    counts = Counter(request[0] for request in stream)
    # P(rank 1) / P(rank 2) = 2 ** 1.1 ≈ 2.14; the head query is ~1/6 of a 1000-query Zipf(1.1) stream.
    assert 1.8 < counts["q0"] / counts["q1"] < 2.5
    assert 0.12 < counts["q0"] / len(stream) < 0.2
    assert len(counts) < len(universe)  # the tail is rarely drawn: repeats are the common case
