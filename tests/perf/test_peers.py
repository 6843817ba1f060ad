"""The peer benchmark's deterministic parts: corpus selection, agreement metrics, the table."""

from __future__ import annotations

import numpy as np
import pytest

from bench import peers_corpus
from bench.peers_report import Result, render_table, row_cosines, top_k_overlap

DOCS = [
    "Return the number of items in a deque.",
    "Deep copy operation on arbitrary Python objects.\n\nSee the module's __doc__ string for more info. "
    + "word " * 30,
    "lowercase start is not a query.",
    "Too short.",
    "A very long docstring. " + " ".join(f"w{i}" for i in range(400)),
    "Return the number of items in a deque.",  # duplicates count once
]


def test_query_and_document_extraction() -> None:
    assert peers_corpus.query_of(DOCS[0]) == "Return the number of items in a deque."
    assert peers_corpus.query_of(DOCS[1]) == "Deep copy operation on arbitrary Python objects."
    assert peers_corpus.query_of(DOCS[2]) is None  # not a sentence
    assert peers_corpus.query_of(DOCS[3]) is None  # two words
    assert peers_corpus.document_of(DOCS[0]) is None  # under 20 words
    long_doc = peers_corpus.document_of(DOCS[4])
    assert long_doc is not None and len(long_doc.split()) == peers_corpus.DOC_MAX_WORDS
    assert "\n" not in (peers_corpus.document_of(DOCS[1]) or "\n")


def test_selection_is_deterministic_and_order_free() -> None:
    a = peers_corpus.select(DOCS, 2, 2)
    b = peers_corpus.select(list(reversed(DOCS)), 2, 2)
    assert a == b and a.digest() == b.digest()
    assert len(set(a.queries)) == 2 and len(a.documents) == 2
    assert a.texts == [a.queries[0], a.documents[0], a.queries[1], a.documents[1]]
    with pytest.raises(ValueError, match="corpus too small"):
        peers_corpus.select(DOCS, 3, 1)


def test_stdlib_corpus_is_real_english_and_stable() -> None:
    """The real corpus: 1,000 + 1,000 texts, the same on every call, documents up to 200 words."""
    docstrings = list(peers_corpus.stdlib_docstrings())
    one = peers_corpus.select(docstrings, 1000, 1000)
    assert one.digest() == peers_corpus.select(docstrings, 1000, 1000).digest()
    assert len(one.texts) == 2000 and len(set(one.texts)) == 2000
    assert all(3 <= len(q.split()) <= 16 for q in one.queries)
    lengths = [len(d.split()) for d in one.documents]
    assert min(lengths) >= 20 and max(lengths) == 200
    common = {"the", "a", "of", "to", "is"}
    assert sum(bool(common & set(d.lower().split())) for d in one.documents) > 950


def test_row_cosines_and_overlap() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 8))
    assert row_cosines(a, 3.0 * a) == pytest.approx(np.ones(6))
    assert row_cosines(a, -a) == pytest.approx(-np.ones(6))
    b = a.copy()
    b[2] = rng.normal(size=8)
    cos = row_cosines(a, b)
    assert cos.argmin() == 2 and cos[2] < 0.99 and np.delete(cos, 2) == pytest.approx(np.ones(5))
    with pytest.raises(ValueError):
        row_cosines(a, a[:5])
    q, d = rng.normal(size=(4, 8)), rng.normal(size=(20, 8))
    assert top_k_overlap(q, d, q, d, 10) == 1.0
    assert top_k_overlap(q, d, q, -d, 10) == 0.0  # reversed scores: the top 10 are the other 10
    assert top_k_overlap(q, d, q, d, 50) == 1.0  # k capped at the number of documents


def test_table_marks_ours_with_ratios_to_best_peer() -> None:
    ref = Result("st", "256", bulk_s=[20.0, 10.0, 30.0], single_s=[0.010] * 98 + [0.050] * 2)
    inf = Result(
        "infinity", "256", server=True, bulk_s=[40.0], conc_wall_s=[4.0], conc_lat_s=[0.2], min_cos=0.9
    )
    ours = Result("ours", "256", ours=True, server=True, bulk_s=[5.0], conc_wall_s=[2.0], conc_lat_s=[0.1])
    ours.min_cos = 0.99999982
    broken = Result("broken", "?", error="RuntimeError: no")
    lines = render_table([ref, inf, ours, broken], n_texts=2000, conc_n=400, clients=16).splitlines()
    assert (
        lines[0].startswith("| system | truncation")
        and "2,000 texts" in lines[0]
        and "16 concurrent" in lines[0]
    )
    assert lines[2] == "| st | 256 | 100.0 | 10.0 / 50.0 | – (in-process) | reference |"
    assert lines[3] == "| infinity | 256 | 50.0 | – | 100.0, 200 | 0.90000000 |"
    # ours: 2000/5 = 400 texts/s = 4× the best peer (st, 100/s); 200 req/s = 2× Infinity's 100.
    assert lines[4] == (
        "| **ours** | 256 | 400.0 (4.00× best peer) | – | 200.0 (2.00× best server peer), 100 | 0.99999982 |"
    )
    assert lines[5].startswith("| broken | ? | failed: RuntimeError: no |")
