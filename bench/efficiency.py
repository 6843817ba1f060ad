"""Scenario ``efficiency`` (issue 11 §4): what the server itself spends per token, at 1 and 16 clients.

Why server CPU-seconds from ``/proc`` and not req/s alone: on a 2-core machine the load generator
shares the cores with the server, so throughput mixes the server's cost with the client's. The
server process's own ``utime + stime`` (all its threads: event loop, tokeniser lanes, ONNX Runtime's
pool) over a phase, divided into the tokens it embedded in that phase, is the server's efficiency
whatever the client costs. Batching should make 16 concurrent single-text clients much cheaper per
token than one client (one runtime call, one set of thread wake-ups for many inputs); per-request
overhead on the event loop (serialisation, hand-offs, metrics) does not batch and caps that ratio.

Each round, interleaved: the raw ORT session's single-query series (the bundle's ``model.onnx`` on
pre-tokenised ids in this process, 2 threads: the floor the server works above), then for each
server variant one closed-loop client, then 16 (``service_load.closed_loop``, one text per request,
real short queries from ``bench.peers_corpus``). The server variants are ``python -m service``
processes started once and left idle while the others run: the defaults, ``max_batch_wait_ms=0`` and
``max_batch_wait_ms=20`` (does waiting for company while the runtime is busy buy anything, now that
an idle runtime starts at once? 20 ms outlasts a batch here, so that batch gathers until it frees).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import Section, fmt_ms, percentile, stats, table
from bench.service_load import _free_port, bundle, closed_loop, scrape_metrics, server_process

CLIENTS = 16
# Server variants: label → extra environment (defaults otherwise).
VARIANTS: dict[str, dict[str, str]] = {
    "defaults (max_batch_wait_ms 2)": {},
    "max_batch_wait_ms 0": {"EMBED_MAX_BATCH_WAIT_MS": "0"},
    "max_batch_wait_ms 20": {"EMBED_MAX_BATCH_WAIT_MS": "20"},
}


def cpu_seconds(pid: int) -> float:
    """``utime + stime`` of process ``pid`` (all its threads) in seconds, from ``/proc/<pid>/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces; fields after it
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15


@dataclass
class Phase:
    """One (variant, clients) cell, accumulated over rounds."""

    walls: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0  # server CPU seconds, summed over rounds
    tokens: int = 0  # tokens embedded in the timed windows, summed over rounds
    requests: int = 0
    batches: float = 0.0
    inputs: float = 0.0
    per_round: list[float] = field(default_factory=list)  # tokens per CPU-second, each round

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu if self.cpu > 0 else float("nan")


def _token_counts(bundle_dir: Path, queries: list[str], max_len: int) -> list[int]:
    from bench.peers_systems import bundle_tokenizer

    return [len(e.ids) for e in bundle_tokenizer(bundle_dir, max_len).encode_batch(queries)]


def _raw_batches(bundle_dir: Path, queries: list[str], max_len: int, size: int) -> Callable[[], float]:
    """Run ``queries`` through the raw session in length-sorted batches of ``size`` (as the server
    groups lengths); returns a callable giving this process's CPU seconds for one pass."""
    from bench import _models
    from bench.peers_systems import bundle_tokenizer, padded_feeds

    sess = _models.session(bundle_dir / "model.onnx", threads=2)
    rows = sorted((e.ids for e in bundle_tokenizer(bundle_dir, max_len).encode_batch(queries)), key=len)
    feeds = [padded_feeds(rows[start : start + size]) for start in range(0, len(rows), size)]
    sess.run(None, feeds[-1])

    def one_pass() -> float:
        started = time.process_time()
        for feed in feeds:
            sess.run(None, feed)
        return time.process_time() - started

    return one_pass


def _measure(
    phase: Phase, pid: int, metrics_port: int, port: int, payloads: list[list[str]], tokens: int, clients: int
) -> None:
    before_m = scrape_metrics(metrics_port, "embed_batch_size_sum", "embed_batch_size_count")
    marks: list[float] = []

    def mark() -> None:
        marks.append(cpu_seconds(pid))

    wall, lat, codes = asyncio.run(closed_loop(port, payloads, clients, on_start=mark, on_end=mark))
    after_m = scrape_metrics(metrics_port, "embed_batch_size_sum", "embed_batch_size_count")
    bad = {k: v for k, v in codes.items() if k != "OK"}
    if bad:
        raise RuntimeError(f"non-OK replies at {clients} clients: {bad}")
    used = marks[1] - marks[0]
    phase.walls.append(wall)
    phase.latencies += lat
    phase.cpu += used
    phase.tokens += tokens
    phase.requests += len(payloads)
    phase.per_round.append(tokens / used if used > 0 else float("nan"))
    # The warm-up call closed_loop makes (one batch of one) is in these counters: negligible.
    phase.batches += after_m["embed_batch_size_count"] - before_m["embed_batch_size_count"]
    phase.inputs += after_m["embed_batch_size_sum"] - before_m["embed_batch_size_sum"]


def run(rounds: int, quick: bool) -> Section:
    from bench.peers_corpus import load
    from bench.peers_systems import cycle, raw_session_system

    section = Section(
        "efficiency", "Server efficiency: tokens per server CPU-second, 1 vs 16 clients (issue 11 §4)"
    )
    path = bundle("minilm", "fp32")
    max_len = int(json.loads((path / "manifest.json").read_text()).get("max_input_tokens", 256))
    rounds = 1 if quick else max(1, min(rounds, 5))
    n_single, n_conc = (40, 160) if quick else (200, 800)
    queries = load(400, 1).queries
    counts = dict(zip(queries, _token_counts(path, queries, max_len), strict=True))
    singles = [[q] for q in cycle(queries, n_single)]
    concurrent = [[q] for q in cycle(queries[::-1], n_conc)]
    tokens_single = sum(counts[p[0]] for p in singles)
    tokens_conc = sum(counts[p[0]] for p in concurrent)
    raw = raw_session_system(path, queries[:32], queries, max_len)
    batched = _raw_batches(path, [p[0] for p in concurrent], max_len, CLIENTS)
    raw_lat: list[float] = []
    raw_cpu = {1: 0.0, CLIENTS: 0.0}  # the raw session's own CPU: the model's batching gain
    cells: dict[tuple[str, int], Phase] = {(v, c): Phase() for v in VARIANTS for c in (1, CLIENTS)}
    loads: list[float] = []
    with ExitStack() as stack:
        servers: dict[str, tuple[int, int, int]] = {}
        for name, env in VARIANTS.items():
            metrics_port = _free_port()
            port, _, proc = stack.enter_context(
                server_process(
                    path, EMBED_DEFAULT_TRUNCATION="end", EMBED_METRICS_PORT=str(metrics_port), **env
                )
            )
            servers[name] = (port, proc.pid, metrics_port)
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            started = time.process_time()
            raw_lat += raw.single(n_single)
            raw_cpu[1] += time.process_time() - started
            raw_cpu[CLIENTS] += batched()
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                port, pid, metrics_port = servers[name]
                _measure(cells[name, 1], pid, metrics_port, port, singles, tokens_single, 1)
                _measure(cells[name, CLIENTS], pid, metrics_port, port, concurrent, tokens_conc, CLIENTS)
            print(f"   round {r + 1}/{rounds} done (load {loads[-1]:.2f})", flush=True)
    raw_p50 = percentile(raw_lat, 50)
    _describe(section, rounds, n_single, n_conc, queries, counts, loads)
    raw_gain = (tokens_conc / raw_cpu[CLIENTS]) / (tokens_single / raw_cpu[1])
    section.add(_table(cells, raw_lat, raw_p50))
    section.add(_verdict(cells, raw_p50))
    section.add(
        f"\nThe model's own batching gain, same run: the raw session (this process's CPU time) embeds "
        f"{tokens_single * rounds / raw_cpu[1]:,.0f} tokens per CPU-second one query per call and "
        f"{tokens_conc * rounds / raw_cpu[CLIENTS]:,.0f} in length-sorted batches of {CLIENTS} of the "
        f"same queries: **{raw_gain:.2f}×**. A server cannot gain more from batching than its model "
        "does, unless its per-request overhead at 1 client is larger than at 16."
    )
    return section


def _table(cells: dict[tuple[str, int], Phase], raw_lat: list[float], raw_p50: float) -> str:
    raw_p99 = fmt_ms(percentile(raw_lat, 99))
    rows: list[list[object]] = [
        ["raw ORT session, pre-tokenised (in-process)", 1, "", fmt_ms(raw_p50), raw_p99, "", "", "", ""]
    ]
    ones = {v: cells[v, 1].tokens_per_cpu_s for v in VARIANTS}
    for (variant, clients), ph in cells.items():
        rps = ph.requests / len(ph.walls) / stats(ph.walls).median
        p50 = percentile(ph.latencies, 50)
        gain = ph.tokens_per_cpu_s / ones[variant]
        rows.append(
            [
                variant,
                clients,
                f"{rps:.0f}",
                fmt_ms(p50) + (f" (raw + {fmt_ms(p50 - raw_p50)})" if clients == 1 else ""),
                fmt_ms(percentile(ph.latencies, 99)),
                f"{ph.inputs / ph.batches:.1f}" if ph.batches else "–",
                f"{1e3 * ph.cpu / ph.requests:.2f}",
                f"{ph.tokens_per_cpu_s:,.0f} ({', '.join(f'{x:,.0f}' for x in ph.per_round)})",
                f"**{gain:.2f}×**" if clients != 1 else "1×",
            ]
        )
    return table(
        ["server", "clients", "req/s", "p50 ms", "p99 ms", "inputs/batch", "server CPU ms/request",
         "tokens per server CPU-s (per round)", "× 1 client"],
        rows,
    )  # fmt: skip


def _verdict(cells: dict[tuple[str, int], Phase], raw_p50: float) -> str:
    base = next(iter(VARIANTS))
    one, many = cells[base, 1], cells[base, CLIENTS]
    extra = percentile(one.latencies, 50) - raw_p50
    gain = many.tokens_per_cpu_s / one.tokens_per_cpu_s

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    return (
        f"\nTargets (server with defaults): single-query p50 ≤ raw p50 + 1.5 ms: +{extra * 1e3:.2f} ms, "
        f"{met(extra <= 1.5e-3)}; tokens per server CPU-second at {CLIENTS} clients ≥ 2.5× 1 client: "
        f"{gain:.2f}×, {met(gain >= 2.5)}."
    )


def _describe(
    section: Section,
    rounds: int,
    n_single: int,
    n_conc: int,
    queries: list[str],
    counts: dict[str, int],
    loads: list[float],
) -> None:
    mean_tokens = sum(counts.values()) / len(counts)
    section.add(
        f"**Measured on a machine shared with other engineers' jobs**: 1-minute load average at the start "
        f"of each round {', '.join(f'{x:.2f}' for x in loads)} ({os.cpu_count()} logical CPUs); "
        "absolute numbers are noisy, the ratios within a run are what the interleaving protects.\n"
    )
    section.add(
        "Real all-MiniLM-L6-v2 fp32 bundle; every server is `python -m service` with 2 intra-op threads, "
        "log level warning, result cache off, truncation end, defaults otherwise. Load: "
        f"{len(queries)} real short queries (standard-library docstring summaries, "
        f"{mean_tokens:.1f} tokens on average with special tokens), one text per `Embed` request "
        f"(packed float32), closed loop (`service_load.closed_loop`, client in the bench process on the "
        f"same cores): {n_single} requests from 1 client, then {n_conc} from {CLIENTS} clients, per "
        f"server per round; {rounds} rounds, raw session first, servers alternating order. Server CPU "
        "= `utime + stime` of the server process from `/proc/<pid>/stat` (10 ms ticks) around each "
        "timed window; tokens = the requests' token counts (the bundle's tokenizer, as the server "
        "counts them); inputs/batch from the server's `embed_batch_size` histogram. req/s = median "
        f"over rounds; latency percentiles pool all rounds; the raw row is {n_single} single-text "
        "`session.run` calls per round on pre-tokenised ids (2 threads, no spinning).\n"
    )
