"""The systems the peer benchmark times, each behind the same three calls (bulk, single, concurrent).

Why these adapters: the peers run in their own venvs (``peers_worker.py`` over a pipe, Infinity as
its own server), ours run from this process (the raw ORT session in-process, the gRPC server and
its HTTP front end as the ``python -m service`` subprocess that ``service_load.server`` starts).
The round-robin in ``bench.peers`` only sees ``System``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench import peers_env
from bench.peers_http import http_closed_loop
from bench.peers_report import Result

BATCH = 32  # texts per bulk call / request, for every system
BULK_IN_FLIGHT = 2  # bulk requests in flight to a server (pipelining, as an async client does)


@dataclass
class System:
    result: Result
    bulk: Callable[[Path | None], float]  # seconds for the whole corpus; saves vectors (.npy) if asked
    single: Callable[[int], list[float]]  # latencies of n one-query calls
    concurrent: Callable[[int, int], tuple[float, list[float]]] | None = None  # (n, clients) → wall, lat
    timed: bool = True  # False: embeds the corpus once for the cosine column, times nothing


def chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


class Worker:
    """One in-process peer (``peers_worker.py``) running in its venv; JSON lines over a pipe."""

    def __init__(self, env: str, peer: str, model_dir: Path, corpus_file: Path, log: Path) -> None:
        self.log = log
        self._err: IO[str] = log.open("w")
        script = Path(__file__).with_name("peers_worker.py")
        self.proc = subprocess.Popen(
            [str(peers_env.ENVS[env].python), str(script), peer, str(model_dir), str(corpus_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=peers_env.offline_env(),
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@peer "):
                reply: dict[str, Any] = json.loads(line[len("@@peer ") :])
                return reply
        self.proc.wait(timeout=30)
        tail = self.log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"peer worker exited rc {self.proc.returncode}:\n{tail}")

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self.proc.stdin:  # EOF ends the worker's command loop
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.proc.kill()
        self._err.close()


def worker_system(worker: Worker, name: str, truncation: str) -> System:
    return System(
        Result(name, truncation),
        bulk=lambda save: float(worker.call(op="bulk", save=str(save) if save else None)["seconds"]),
        single=lambda n: [float(x) for x in worker.call(op="single", n=n)["latencies"]],
    )


def http_system(
    url: str, name: str, truncation: str, texts: list[str], queries: list[str], ours: bool, model: str | None
) -> System:
    """A server behind an OpenAI-shaped HTTP endpoint (ours or Infinity)."""

    def bulk(save: Path | None) -> float:
        wall, _, codes, vecs = asyncio.run(
            http_closed_loop(url, chunks(texts, BATCH), BULK_IN_FLIGHT, model, keep=save is not None)
        )
        _check(codes, "200", name)
        if save is not None and vecs is not None:
            np.save(save, vecs)
        return wall

    def single(n: int) -> list[float]:
        _, lat, codes, _ = asyncio.run(http_closed_loop(url, [[q] for q in cycle(queries, n)], 1, model))
        _check(codes, "200", name)
        return lat

    def concurrent(n: int, clients: int) -> tuple[float, list[float]]:
        wall, lat, codes, _ = asyncio.run(
            http_closed_loop(url, [[q] for q in cycle(queries, n)], clients, model)
        )
        _check(codes, "200", name)
        return wall, lat

    return System(Result(name, truncation, ours=ours, server=True), bulk, single, concurrent)


def grpc_system(port: int, name: str, truncation: str, texts: list[str], queries: list[str]) -> System:
    """Our gRPC server, timed with the existing ``service_load.closed_loop`` load generator."""
    from bench.service_load import closed_loop

    def bulk(save: Path | None) -> float:
        wall, _, codes = asyncio.run(closed_loop(port, chunks(texts, BATCH), BULK_IN_FLIGHT))
        _check(codes, "OK", name)
        if save is not None:
            np.save(save, grpc_vectors(port, texts))
        return wall

    def single(n: int) -> list[float]:
        _, lat, codes = asyncio.run(closed_loop(port, [[q] for q in cycle(queries, n)], 1))
        _check(codes, "OK", name)
        return lat

    def concurrent(n: int, clients: int) -> tuple[float, list[float]]:
        wall, lat, codes = asyncio.run(closed_loop(port, [[q] for q in cycle(queries, n)], clients))
        _check(codes, "OK", name)
        return wall, lat

    return System(Result(name, truncation, ours=True, server=True), bulk, single, concurrent)


def grpc_vectors(port: int, texts: list[str]) -> np.ndarray:
    """The server's vectors for ``texts`` (untimed; for the cosine column)."""
    import grpc

    from bench.service_load import _request
    from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

    rows: list[np.ndarray] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for chunk in chunks(texts, BATCH):
            reply = stub.Embed(_request(chunk), timeout=120)
            for e in sorted(reply.embeddings, key=lambda e: e.index):
                rows.append(np.frombuffer(e.packed, "<f4") if e.packed else np.asarray(e.values, np.float32))
    return np.stack(rows)


def bundle_tokenizer(bundle_dir: Path, max_len: int) -> Any:
    """The bundle's ``tokenizer.json``, unpadded, truncating at ``max_len`` (ids as the server sees them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def padded_feeds(rows: list[list[int]]) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids`` / ``attention_mask`` for one session call."""
    ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def raw_session_system(bundle_dir: Path, texts: list[str], queries: list[str], max_len: int) -> System:
    """The bundle's ``model.onnx`` on ids tokenised beforehand: the ceiling the server works under."""
    from bench import _models

    sess = _models.session(bundle_dir / "model.onnx", threads=2)
    tok = bundle_tokenizer(bundle_dir, max_len)

    def arrays(batch: list[str]) -> dict[str, np.ndarray]:
        return padded_feeds([e.ids for e in tok.encode_batch(batch)])

    # Length-sorted batches, as sentence-transformers does for its bulk encode.
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches = [(idx, arrays([texts[i] for i in idx])) for idx in chunks_idx(order, BATCH)]
    singles = [arrays([q]) for q in queries]
    sess.run(None, batches[-1][1])  # warm-up, like the others' first call: allocations and the
    sess.run(None, singles[0])  # first-shape costs are not what we measure

    def bulk(save: Path | None) -> float:
        import time

        out = np.zeros((len(texts), 0), np.float32)
        start = time.perf_counter()
        results = [(idx, sess.run(None, feed)[0]) for idx, feed in batches]
        took = time.perf_counter() - start
        if save is not None:
            out = np.zeros((len(texts), results[0][1].shape[1]), np.float32)
            for idx, vecs in results:
                out[idx] = vecs
            np.save(save, out)
        return took

    def single(n: int) -> list[float]:
        import time

        lat = []
        for i in range(n):
            feed = singles[i % len(singles)]
            start = time.perf_counter()
            sess.run(None, feed)
            lat.append(time.perf_counter() - start)
        return lat

    return System(Result("ours: raw ORT session, pre-tokenised", str(max_len), ours=True), bulk, single)


def chunks_idx(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def cycle(items: list[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def _check(codes: Any, ok: str, name: str) -> None:
    bad = {k: v for k, v in dict(codes).items() if k != ok}
    if bad:
        raise RuntimeError(f"{name}: non-OK replies {bad}")
