"""The peer benchmark's corpus: real English docstrings from the running Python's standard library.

Why docstrings: the benchmark must use real text that every machine already has (no download, no
generated strings), with both short query-like sentences and longer passages. The standard
library's docstrings are written English prose about code, and ``ast`` reads them without
importing anything (no side effects, no platform-dependent modules), so the same Python version
always yields the same corpus. Queries are one-sentence docstring summaries of 3–16 words
("Return the number of items in a deque."); documents are whole docstrings of at least 20 words,
cut after ~200 words. Selection is deterministic: candidates are deduplicated, ordered by the
sha256 of their text (a fixed pseudo-random spread over all modules) and the first N taken.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
QUERY_WORDS = (3, 16)
DOC_MIN_WORDS = 20
DOC_MAX_WORDS = 200


@dataclass(frozen=True)
class Corpus:
    queries: list[str]
    documents: list[str]

    @property
    def texts(self) -> list[str]:
        """The bulk order: queries and documents interleaved, the longer list's tail last."""
        out: list[str] = []
        for i in range(max(len(self.queries), len(self.documents))):
            out += self.queries[i : i + 1] + self.documents[i : i + 1]
        return out

    def digest(self) -> str:
        """Short sha256 of the selected texts: two runs with the same digest used the same corpus."""
        h = hashlib.sha256()
        for text in self.texts:
            h.update(text.encode("utf-8") + b"\0")
        return h.hexdigest()[:12]


def stdlib_docstrings(root: Path | None = None) -> Iterator[str]:
    """Every module, class and function docstring under ``root`` (default: this Python's Lib/)."""
    base = root or Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(base.rglob("*.py")):
        if SKIP_PARTS.intersection(path.relative_to(base).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def query_of(doc: str) -> str | None:
    """The docstring's first paragraph as one line, if it reads as a short sentence."""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    n = len(first.split())
    ok = QUERY_WORDS[0] <= n <= QUERY_WORDS[1] and first[:1].isupper() and first.endswith(".")
    return first if ok else None


def document_of(doc: str) -> str | None:
    """The docstring with whitespace normalised, cut after DOC_MAX_WORDS words; None if too short."""
    words = doc.split()
    if len(words) < DOC_MIN_WORDS:
        return None
    return " ".join(words[:DOC_MAX_WORDS])


def _by_hash(texts: Iterable[str]) -> list[str]:
    return sorted(set(texts), key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())


def select(docstrings: Iterable[str], n_queries: int, n_documents: int) -> Corpus:
    """Deterministic selection: the same docstrings give the same corpus, in the same order."""
    docs = list(docstrings)
    queries = _by_hash(q for q in map(query_of, docs) if q)
    documents = _by_hash(d for d in map(document_of, docs) if d)
    if len(queries) < n_queries or len(documents) < n_documents:
        raise ValueError(
            f"corpus too small: {len(queries)} queries / {len(documents)} documents available, "
            f"{n_queries} / {n_documents} wanted"
        )
    return Corpus(queries[:n_queries], documents[:n_documents])


def load(n_queries: int = 1000, n_documents: int = 1000) -> Corpus:
    return select(stdlib_docstrings(), n_queries, n_documents)
