"""Scenario ``waste``: padded-token waste of a mixed workload, FIFO vs length grouping (issue 6 §4).

Why: a batch costs ``batch × longest``; one 500-token document among 10-token queries makes
every query pay 500. The "with grouping" figure drives the service's real ``Batcher`` (fake
runtime that only records shapes); "without" packs the same arrival order FIFO under the same
token budget and batch size.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from bench._common import Section, padded_waste, table


def mixed_lengths(n: int, seed: int = 0, long_share: float = 0.2) -> list[int]:
    """80 % short queries (8–40 tokens), 20 % long documents (200–512 tokens)."""
    rnd = random.Random(seed)
    return [rnd.randint(200, 512) if rnd.random() < long_share else rnd.randint(8, 40) for _ in range(n)]


def fifo_batches(lengths: Sequence[int], max_tokens: int, max_size: int) -> list[list[int]]:
    """Arrival-order batches: close a batch when the next input would break the padded budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    for n in lengths:
        grown = max([n, *current])
        if current and ((len(current) + 1) * grown > max_tokens or len(current) >= max_size):
            batches.append(current)
            current = []
        current.append(n)
    if current:
        batches.append(current)
    return batches


async def _grouped(
    lengths: Sequence[int], max_tokens: int, max_size: int, concurrency: int
) -> list[list[int]]:
    import numpy as np

    from service.batcher import Batcher
    from service.settings import Settings

    shapes: list[list[int]] = []

    class Recorder:
        providers = ("CPUExecutionProvider",)

        def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            shapes.append([int(x) for x in attention_mask.sum(axis=1)])
            n = input_ids.shape[0]
            return np.ones((n, 4), np.float32) / 2, np.ones(n, np.float32)

    batcher = Batcher(
        Recorder(),
        max_batch_tokens=max_tokens,
        max_batch_size=max_size,
        max_batch_wait_ms=5.0,
        max_queue_tokens=10**9,
        pad_id=0,
        max_padding_ratio=Settings.model_fields["max_padding_ratio"].default,
    )
    batcher.start()
    queue = list(lengths)

    async def client() -> None:
        while queue:
            n = queue.pop(0)
            await batcher.submit([[1] * n])

    await asyncio.gather(*(client() for _ in range(concurrency)))
    await batcher.close()
    return shapes


def run(rounds: int, quick: bool, models: list[str] | None = None) -> Section:
    del rounds, models
    section = Section(
        "waste", "Mixed-length workload: padded-token waste with and without length grouping (issue 6 §4)"
    )
    n = 400 if quick else 2000
    lengths = mixed_lengths(n)
    rows = []
    for max_tokens, max_size, conc in [(16384, 64, 64), (4096, 32, 32)]:
        fifo = padded_waste(fifo_batches(lengths, max_tokens, max_size))
        try:
            grouped_batches = asyncio.run(_grouped(lengths, max_tokens, max_size, conc))
            grouped = f"**{padded_waste(grouped_batches):.1%}** ({len(grouped_batches)} batches)"
        except Exception as exc:  # the service module is another engineer's; report, don't crash
            grouped = f"not measured: {type(exc).__name__}: {exc}"[:120]
        rows.append([f"{max_tokens} / {max_size}", conc, f"{fifo:.1%}", grouped])
    section.add(
        f"{n} single-text requests, 80 % queries of 8–40 tokens, 20 % documents of 200–512 tokens, "
        "sent by a closed loop of N concurrent clients. Waste = padding / paid tokens. "
        "Target ≤ 15 %.\n"
    )
    section.add(
        table(["max_batch_tokens / max_batch_size", "clients", "FIFO waste", "service Batcher waste"], rows)
    )
    return section
