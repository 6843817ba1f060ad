"""The result cache (service/cache.py): LRU bound in bytes, partial hits, and bit-identical vectors.

The proof that a hit returns exactly what a miss returns runs on the real fp32 export of the tiny
gte-Qwen2 (a transformer graph, not the toy mean): the same requests against a server with the
cache and one without give byte-identical float32 vectors, for every post-processing variant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from svc_harness import Harness, serving

from service.batch_items import BatchOutput
from service.cache import ENTRY_OVERHEAD_BYTES, VectorCache, cache_key, submit_cached
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.settings import Settings

SHA = "0" * 64
DIM = 8


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def entry_bytes(ids: Sequence[int]) -> int:
    return ENTRY_OVERHEAD_BYTES + len(SHA) + 4 * len(ids) + 4 * DIM


def test_lru_keeps_within_the_byte_bound_and_evicts_the_least_recently_used() -> None:
    cache = VectorCache(capacity_bytes=3 * entry_bytes([1, 2]))
    keys = [cache_key(SHA, [i, i + 1]) for i in range(4)]
    for i in range(3):
        cache.put(keys[i], vec(i), float(i + 1))
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used; 1 the least
    cache.put(keys[3], vec(3), 4.0)
    assert cache.get(keys[1]) is None
    assert [cache.get(k) is not None for k in (keys[0], keys[2], keys[3])] == [True, True, True]
    stats = cache.stats()
    assert stats.evictions == 1
    assert stats.entries == 3
    assert stats.bytes == 3 * entry_bytes([1, 2]) <= stats.capacity_bytes
    assert (stats.hits, stats.misses) == (4, 1)


def test_keys_are_exact_ids_and_bundle() -> None:
    cache = VectorCache(capacity_bytes=1 << 20)
    cache.put(cache_key(SHA, [1, 2, 3]), vec(0), 1.0)
    assert cache.get(cache_key(SHA, [1, 2, 3])) is not None
    assert cache.get(cache_key(SHA, [1, 2])) is None
    assert cache.get(cache_key(SHA, [3, 2, 1])) is None
    assert cache.get(cache_key("1" * 64, [1, 2, 3])) is None  # another bundle's vector never leaks


def test_stored_vectors_are_copies_and_read_only() -> None:
    cache = VectorCache(capacity_bytes=1 << 20)
    original = vec(0)
    expected = original.copy()
    key = cache_key(SHA, [5])
    cache.put(key, original, 2.0)
    original[:] = 0.0  # the caller reuses its buffer
    found = cache.get(key)
    assert found is not None
    assert found[0].tobytes() == expected.tobytes()
    assert found[1] == 2.0
    with pytest.raises(ValueError):
        found[0][0] = 1.0


def test_zero_capacity_disables_and_oversized_entries_are_not_stored() -> None:
    off = VectorCache(capacity_bytes=0)
    off.put(cache_key(SHA, [1]), vec(0), 1.0)
    assert off.get(cache_key(SHA, [1])) is None
    assert off.stats().misses == 0  # a disabled cache counts nothing
    tiny = VectorCache(capacity_bytes=ENTRY_OVERHEAD_BYTES)
    tiny.put(cache_key(SHA, [1]), vec(0), 1.0)
    assert tiny.stats().entries == 0


class RecordingBatcher:
    """Answers each input with vec(first id); records what was submitted."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, ...]]] = []

    async def submit(
        self, ids: Sequence[Sequence[int]], deadline: float | None = None, *, request_id: str = ""
    ) -> BatchOutput:
        self.calls.append([tuple(x) for x in ids])
        vectors = np.stack([vec(x[0]) for x in ids])
        norms = np.array([float(x[0]) + 0.5 for x in ids], dtype=np.float32)
        return BatchOutput(vectors, norms, queue_ms=1.0, inference_ms=2.0)


@pytest.mark.asyncio
async def test_partial_hits_send_only_the_misses_to_the_batcher() -> None:
    cache, batcher = VectorCache(1 << 20), RecordingBatcher()
    first = await submit_cached(cache, SHA, batcher, [(1, 9), (2, 9)], None)
    mixed = await submit_cached(cache, SHA, batcher, [(3, 9), (1, 9), (4, 9), (2, 9)], None)
    assert batcher.calls == [[(1, 9), (2, 9)], [(3, 9), (4, 9)]]
    for row, seed in enumerate((3, 1, 4, 2)):
        assert mixed.vectors[row].tobytes() == vec(seed).tobytes()
        assert mixed.norms[row] == np.float32(seed + 0.5)
    assert mixed.vectors[1].tobytes() == first.vectors[0].tobytes()
    hits = await submit_cached(cache, SHA, batcher, [(4, 9), (3, 9)], None)
    assert len(batcher.calls) == 2  # all hits: the batcher is not involved
    assert (hits.queue_ms, hits.inference_ms) == (0.0, 0.0)
    assert cache.stats().hits == 4


# --- the real model: bit-identical on fp32 ----------------------------------------------------
TEXTS = ["the quick brown fox", "jumps over the lazy dog", "a", "embeddings are vectors of floats"]
VARIANTS: list[dict[str, object]] = [
    {},
    {"normalize": False},
    {"dimensions": 16},
    {"input_type": pb.INPUT_TYPE_QUERY, "instruction": "find the fox"},
]


async def packed(h: Harness, texts: Sequence[str], **fields: object) -> list[bytes]:
    request = pb.EmbedRequest(inputs=list(texts), encoding=pb.ENCODING_FLOAT32, **fields)  # type: ignore[arg-type]
    response = await h.stub.Embed(request, timeout=60)
    return [e.packed for e in response.embeddings]


def scrape(h: Harness) -> dict[str, float]:
    assert h.metrics is not None
    text = h.metrics.render()[0].decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("embed_cache_") or sample.name == "embed_batch_size_count"
    }


@pytest.mark.asyncio
async def test_a_hit_is_bit_identical_to_a_miss_on_fp32(tiny_qwen2_bundle: Path) -> None:
    options = {"allow_dimensions": True, "max_batch_wait_ms": 1.0}
    async with (
        serving(tiny_qwen2_bundle, edge=True, cache_bytes=1 << 20, **options) as cached,
        serving(tiny_qwen2_bundle, edge=True, cache_bytes=0, **options) as plain,
    ):
        for fields in VARIANTS:
            reference = await packed(plain, TEXTS, **fields)
            miss = await packed(cached, TEXTS, **fields)
            before = scrape(cached)
            hit = await packed(cached, TEXTS, **fields)
            after = scrape(cached)
            assert hit == miss == reference, fields
            assert after["embed_cache_hits_total"] - before["embed_cache_hits_total"] == len(TEXTS)
            assert after["embed_cache_misses_total"] == before["embed_cache_misses_total"]
            assert after["embed_batch_size_count"] == before["embed_batch_size_count"]  # no model run
            for index, text in enumerate(TEXTS):  # each hit alone, as a single-input request
                assert await packed(cached, [text], **fields) == [miss[index]]
        stats = scrape(cached)
        assert stats["embed_cache_entries"] > 0
        assert 0 < stats["embed_cache_bytes"] <= stats["embed_cache_capacity_bytes"] == 1 << 20
        assert stats["embed_cache_evictions_total"] == 0
        off = scrape(plain)
        assert off["embed_cache_hits_total"] == off["embed_cache_misses_total"] == 0


@pytest.mark.asyncio
async def test_concurrent_identical_requests_all_get_the_same_vector(tiny_qwen2_bundle: Path) -> None:
    async with serving(tiny_qwen2_bundle, edge=True, cache_bytes=1 << 20) as h:
        answers = await asyncio.gather(*(packed(h, TEXTS[:2]) for _ in range(6)))
        assert all(a == answers[0] for a in answers)
        assert await packed(h, TEXTS[:2]) == answers[0]


def test_cache_bytes_setting() -> None:
    assert Settings.model_fields["cache_bytes"].default == 64 * 1024**2
    with pytest.raises(ValueError):
        Settings(model_dir=Path("."), cache_bytes=-1)
