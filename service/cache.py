"""An in-memory LRU cache of model outputs, keyed by the exact model input ids.

Why here, between tokenisation and the batcher: search traffic repeats (a few queries make up much
of the stream), and the model run is the expensive part. Everything before the model (instruction,
special tokens, truncation) is already folded into the ids, so equal ids mean an equal model input,
whichever front end (gRPC, HTTP, rerank) the request came from.

What is stored is the batcher's answer for one input (the unit vector and its norm), before
post-processing: ``normalize`` and ``dimensions`` are applied afterwards by the same pure function on
hits and misses alike, so they need not be part of the key and one entry serves every variant. A
hit returns exactly the float32 vector the miss that stored it returned (tests/service/
test_svc_cache.py proves it bit for bit). Where a graph's output depends on the batch it ran in by
a few ulps (docs/reliability.md), a hit repeats the first batch's answer instead of computing anew.

The key also carries the bundle's sha256, so one cache could hold several models' vectors without
mixing them. Size is bounded in bytes (vectors + keys + a fixed per-entry overhead); the least
recently used entries are evicted first. Single-threaded: called only from the event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.batch_items import BatchOutput
from service.domain import FloatArray

# Per-entry bookkeeping beyond the vector and key bytes (dict slot, tuple, array headers).
ENTRY_OVERHEAD_BYTES = 256

Key = tuple[str, bytes]


@dataclass(frozen=True)
class CacheStats:
    """Totals since start (counters) and the current size (gauges), read at scrape time."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    capacity_bytes: int = 0


def cache_key(bundle_sha256: str, ids: Sequence[int]) -> Key:
    """Exact ids (no hash to collide): 4 bytes per id, as the model's vocabulary fits in uint32."""
    return bundle_sha256, np.asarray(ids, dtype=np.uint32).tobytes()


class VectorCache:
    """LRU of (unit vector, norm) per model input; ``capacity_bytes=0`` stores nothing."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Key, tuple[FloatArray, float]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @staticmethod
    def _size(key: Key, vector: FloatArray) -> int:
        return ENTRY_OVERHEAD_BYTES + len(key[0]) + len(key[1]) + vector.nbytes

    def get(self, key: Key) -> tuple[FloatArray, float] | None:
        """The stored (read-only unit vector, norm), most recently used now; None on a miss."""
        if not self.enabled:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry

    def put(self, key: Key, vector: FloatArray, norm: float) -> None:
        """Store a copy (callers may go on to change their array); evict LRU entries to fit."""
        if not self.enabled:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.setflags(write=False)
        size = self._size(key, stored)
        if size > self.capacity_bytes:
            return  # one entry bigger than the whole cache: not worth evicting everything for
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self._size(key, old[0])
        self._entries[key] = (stored, float(norm))
        self._bytes += size
        while self._bytes > self.capacity_bytes:
            evicted_key, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= self._size(evicted_key, evicted)
            self._evictions += 1

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            bytes=self._bytes,
            entries=len(self._entries),
            capacity_bytes=self.capacity_bytes,
        )


class _Submit(Protocol):
    async def submit(
        self, ids: Sequence[Sequence[int]], deadline: float | None = None, *, request_id: str = ""
    ) -> BatchOutput: ...


async def submit_cached(
    cache: VectorCache,
    bundle_sha256: str,
    batcher: _Submit,
    ids: Sequence[Sequence[int]],
    deadline: float | None,
    *,
    request_id: str = "",
) -> BatchOutput:
    """``batcher.submit`` for the inputs the cache does not hold; the rest come from the cache.

    All hits: the batcher is not involved at all (queue and inference time 0). Misses are stored
    once computed, so the next identical input is a hit.
    """
    if not cache.enabled:
        return await batcher.submit(ids, deadline, request_id=request_id)
    keys = [cache_key(bundle_sha256, seq) for seq in ids]
    found = [cache.get(key) for key in keys]
    missing = [i for i, entry in enumerate(found) if entry is None]
    if len(missing) == len(ids):
        out = await batcher.submit(ids, deadline, request_id=request_id)
        for i, key in enumerate(keys):
            cache.put(key, out.vectors[i], float(out.norms[i]))
        return out
    queue_ms = inference_ms = 0.0
    computed: BatchOutput | None = None
    if missing:
        computed = await batcher.submit([ids[i] for i in missing], deadline, request_id=request_id)
        queue_ms, inference_ms = computed.queue_ms, computed.inference_ms
    first = next(entry for entry in found if entry is not None)
    vectors = np.empty((len(ids), first[0].shape[0]), dtype=np.float32)
    norms = np.empty(len(ids), dtype=np.float32)
    for i, entry in enumerate(found):
        if entry is not None:
            vectors[i], norms[i] = entry
    if computed is not None:
        for row, i in enumerate(missing):
            vectors[i], norms[i] = computed.vectors[row], computed.norms[row]
            cache.put(keys[i], computed.vectors[row], float(computed.norms[row]))
    return BatchOutput(vectors, norms, queue_ms, inference_ms)
