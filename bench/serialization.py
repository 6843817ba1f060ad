"""Scenario ``serialize``: EmbedResponse build + serialise, repeated float vs packed bytes (issue 6 §5).

Why it matters: for 3584-dim vectors a response of 256 vectors is 917k floats; protobuf's
repeated-float path converts every Python float, while ``packed`` is one ``tobytes()`` per
vector. Measured on the project's own generated messages, build + ``SerializeToString``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bench._common import Section, fmt_ms, ratio, round_robin, stats, table

DIM = 3584


def build_values(vectors: np.ndarray) -> Callable[[], bytes]:
    from service.pb.embedding.v1 import embedding_pb2 as pb

    def run() -> bytes:
        resp = pb.EmbedResponse()
        for i, vec in enumerate(vectors):
            resp.embeddings.add(index=i, values=vec)
        return resp.SerializeToString()

    return run


def build_packed(vectors: np.ndarray) -> Callable[[], bytes]:
    from service.pb.embedding.v1 import embedding_pb2 as pb

    def run() -> bytes:
        resp = pb.EmbedResponse()
        data = vectors.astype("<f4", copy=False)
        for i in range(len(data)):
            resp.embeddings.add(index=i, packed=data[i].tobytes())
        return resp.SerializeToString()

    return run


def run(rounds: int, quick: bool, models: list[str] | None = None) -> Section:
    del models
    section = Section(
        "serialize", "Serialisation of 3584-dim vectors: repeated float vs packed bytes (issue 6 §5)"
    )
    rows = []
    rng = np.random.default_rng(0)
    for n in [1, 32] if quick else [1, 32, 256]:
        vectors = rng.standard_normal((n, DIM)).astype(np.float32)
        samples = round_robin(
            {"values": build_values(vectors), "packed": build_packed(vectors)}, max(rounds, 5)
        )
        base = stats(samples["values"])
        packed = stats(samples["packed"])
        size_v, size_p = len(build_values(vectors)()), len(build_packed(vectors)())
        rows.append(
            [
                n,
                fmt_ms(base.median),
                f"{base.spread_pct:.0f}%",
                fmt_ms(packed.median),
                f"{packed.spread_pct:.0f}%",
                f"**{ratio(packed.median, base.median):.1f}×**",
                f"{size_v / 1024:.0f} / {size_p / 1024:.0f}",
            ]
        )
    section.add(
        f"Message build + `SerializeToString()` of `EmbedResponse` (generated code, upb backend), "
        f"{max(rounds, 5)} rounds round-robin (1- and 32-vector calls timed in groups of 256/n). "
        "Target: packed ≥ 5× faster at 256 vectors.\n"
    )
    section.add(
        table(
            [
                "vectors",
                "repeated float ms",
                "spread",
                "packed ms",
                "spread",
                "packed speed-up",
                "KiB values / packed",
            ],
            rows,
        )
    )
    return section
