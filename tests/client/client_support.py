"""Small helpers for the client tests: server-side request counts and the toy model's truth."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
from rel_toy import CLS, SEP, content_ids, embedding_table, reference, toy_tokenizer

_LINE = re.compile(r'^embed_requests_total\{api="grpc",code="(\w+)",method="(\w+)"\} ([0-9.e+]+)$', re.M)


def request_counts(http_url: str, method: str = "Embed") -> dict[str, int]:
    """Calls the server answered per gRPC status (its Prometheus counter): retries included."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {code: int(float(n)) for code, m, n in _LINE.findall(text) if m == method}


def wait_count(http_url: str, code: str, at_least: int, method: str = "Embed", timeout_s: float = 60) -> int:
    """Polls: the server records a call's status just after the reply went out."""
    deadline = time.monotonic() + timeout_s
    while True:
        n = request_counts(http_url, method).get(code, 0)
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.02)


def queued_tokens(http_url: str) -> float:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r"^embed_queue_tokens ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_queued(http_url: str, tokens: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while queued_tokens(http_url) < tokens:
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.02)


def toy_truth(texts: list[str]) -> np.ndarray:
    """The toy model's vectors computed without the server (mean of token rows, normalised)."""
    tok = toy_tokenizer()
    vectors, _ = reference(embedding_table(), [[CLS, *content_ids(tok, t), SEP] for t in texts])
    return vectors.astype(np.float32)


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + j) % 500}" for j in range(n))
