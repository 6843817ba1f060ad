"""Scenario ``cache`` (issue 14 §3): the result cache on a Zipf-distributed query stream.

Why Zipf (s ≈ 1.1): search traffic is heavy-headed — a few queries make up much of the stream and
most queries are rare — which is the case the cache is for. Two ``python -m service`` processes
serve the same bundle, one with the default ``--cache-bytes`` and one with ``0``; each round sends
the same stream to both, alternating which goes first, so both see the same machine load. Every
round draws its queries from a fresh universe, so each round starts with a cold cache (hits come
only from repeats within the round) and rounds are comparable.
"""

from __future__ import annotations

import asyncio
import random

from bench._common import Section, table
from bench.service_load import LoadRun, _free_port, bundle, closed_loop, load_rows, scrape_metrics, server
from bench.tokenization import texts

ZIPF_S = 1.1
CLIENTS = 8
CACHE_BYTES = 64 * 1024**2  # the default of --cache-bytes


def zipf_stream(universe: list[str], n: int, s: float, seed: int) -> list[list[str]]:
    """``n`` single-query requests; query of rank k drawn with probability ∝ 1 / k**s."""
    weights = [1.0 / (k**s) for k in range(1, len(universe) + 1)]
    return [[q] for q in random.Random(seed).choices(universe, weights=weights, k=n)]


def run(rounds: int, quick: bool) -> Section:
    section = Section("cache", "Result cache on a Zipf query stream: with vs without, same run (issue 14 §3)")
    path = bundle("minilm", "fp32")
    n, distinct = (300, 300) if quick else (1500, 1500)
    rounds = max(1, min(rounds, 3))
    results: dict[str, list[LoadRun]] = {"cache off": [], "cache on": []}
    hit_rates: list[float] = []
    unique: list[int] = []
    metrics_port = _free_port()
    with (
        server(path, EMBED_CACHE_BYTES="0") as (port_off, _),
        server(path, EMBED_CACHE_BYTES=str(CACHE_BYTES), EMBED_METRICS_PORT=str(metrics_port)) as (
            port_on,
            _,
        ),
    ):
        ports = {"cache off": port_off, "cache on": port_on}
        for r in range(rounds):
            universe = [f"r{r} {t}" for t in texts(distinct, 10, seed=100 + r)]
            stream = zipf_stream(universe, n, ZIPF_S, seed=r)
            unique.append(len({q[0] for q in stream}))
            before = scrape_metrics(metrics_port, "embed_cache_")
            order = list(ports) if r % 2 == 0 else list(reversed(ports))
            for name in order:
                results[name].append(asyncio.run(closed_loop(ports[name], stream, CLIENTS)))
            after = scrape_metrics(metrics_port, "embed_cache_")
            hits = after["embed_cache_hits_total"] - before["embed_cache_hits_total"]
            misses = after["embed_cache_misses_total"] - before["embed_cache_misses_total"]
            hit_rates.append(hits / max(1.0, hits + misses))
    rows = load_rows(results, n)
    section.add(
        f"Real all-MiniLM-L6-v2 fp32 bundle, two `python -m service` processes (2 intra-op threads each; "
        f"one with the default `--cache-bytes` (64 MiB), one with `--cache-bytes 0`). Each of {rounds} "
        f"rounds draws {n} single-query `Embed` requests from a fresh universe of {distinct} queries "
        f"(≈ 5–10 words) with Zipf s = {ZIPF_S} (P(rank k) ∝ k^-s; {min(unique)}–{max(unique)} distinct "
        f"queries per round), sends the same stream to both servers, alternating which goes first, "
        f"{CLIENTS} closed-loop `grpc.aio` clients; throughput = median over rounds, latency "
        f"percentiles over all requests. Hit rate (server metrics, per round): "
        f"{', '.join(f'{h:.0%}' for h in hit_rates)}; the ceiling is 1 − distinct / requests. "
        "**The machine is shared with other jobs (other engineers' test runs) at the time of this run**: "
        "absolute numbers are noisy, the ratio within a round is what the interleaving protects.\n"
    )
    section.add(table(["server", "req/s", "× cache off", "p50 ms", "p95 ms", "p99 ms", "status"], rows))
    return section
