"""Pure parts of the peer benchmark: agreement metrics and the table (unit-tested, no timing).

Why min cosine per text: a mean hides the few texts a peer embeds differently (a different
truncation shows up only on the long documents); the minimum over the corpus is what a user who
swaps systems can rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench._common import fmt_ms, percentile, stats


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (same texts, two systems)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return np.asarray(np.sum(_unit(a) * _unit(b), axis=1))


def top_k_overlap(
    queries_a: np.ndarray, docs_a: np.ndarray, queries_b: np.ndarray, docs_b: np.ndarray, k: int = 10
) -> float:
    """Mean fraction of each query's top-k documents that two systems' rankings share."""
    k = min(k, len(docs_a))
    top_a = np.argsort(-(_unit(queries_a) @ _unit(docs_a).T), axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-(_unit(queries_b) @ _unit(docs_b).T), axis=1, kind="stable")[:, :k]
    shared = [len(set(x) & set(y)) / k for x, y in zip(top_a.tolist(), top_b.tolist(), strict=True)]
    return float(np.mean(shared))


@dataclass
class Result:
    """What one system measured over all rounds."""

    name: str
    truncation: str
    ours: bool = False
    server: bool = False
    bulk_s: list[float] = field(default_factory=list)  # seconds for the whole corpus, per round
    single_s: list[float] = field(default_factory=list)  # one-query latencies, all rounds
    conc_wall_s: list[float] = field(default_factory=list)  # wall seconds for conc_n requests, per round
    conc_lat_s: list[float] = field(default_factory=list)
    min_cos: float | None = None  # vs the reference; None for the reference itself
    load: list[float] = field(default_factory=list)  # 1-min load average as each bulk pass began
    note: str = ""
    error: str = ""

    def bulk_rate(self, n_texts: int) -> float | None:
        return n_texts / stats(self.bulk_s).median if self.bulk_s else None

    def conc_rate(self, n_requests: int) -> float | None:
        return n_requests / stats(self.conc_wall_s).median if self.conc_wall_s else None


def _best(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def render_table(results: Sequence[Result], n_texts: int, conc_n: int, clients: int) -> str:
    """The markdown table: ours are bold, with ratios to the best peer (and best server peer)."""
    peers = [r for r in results if not r.ours]
    best_bulk = _best([r.bulk_rate(n_texts) for r in peers])
    best_conc = _best([r.conc_rate(conc_n) for r in peers if r.server])
    header = [
        "system",
        "truncation (tokens)",
        f"bulk, {n_texts:,} texts (texts/s)",
        "single query p50 / p99 (ms)",
        f"{clients} concurrent clients (req/s, p99 ms)",
        "min cos to sentence-transformers",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        name = f"**{r.name}**" if r.ours else r.name
        if r.error:
            lines.append(f"| {name} | {r.truncation} | failed: {r.error} | | | |")
            continue
        bulk = r.bulk_rate(n_texts)
        bulk_cell = "–" if bulk is None else f"{bulk:.1f}"
        if r.ours and bulk is not None and best_bulk:
            bulk_cell += f" ({bulk / best_bulk:.2f}× best peer)"
        single = "–"
        if r.single_s:
            single = f"{fmt_ms(percentile(r.single_s, 50))} / {fmt_ms(percentile(r.single_s, 99))}"
        conc = "– (in-process)" if not r.server else "–"
        rate = r.conc_rate(conc_n)
        if rate is not None:
            conc = f"{rate:.1f}"
            if r.ours and best_conc:
                conc += f" ({rate / best_conc:.2f}× best server peer)"
            conc += f", {fmt_ms(percentile(r.conc_lat_s, 99))}"
        cos = "reference" if r.min_cos is None else f"{r.min_cos:.8f}"
        if r.note:
            cos += f"; {r.note}"
        lines.append(f"| {name} | {r.truncation} | {bulk_cell} | {single} | {conc} | {cos} |")
    return "\n".join(lines)
