"""``python -m service`` as a subprocess with HTTP, keys and a metrics port: the real wiring in
``service.server.serve`` (edge → core → gRPC + HTTP), JSON logs on stderr, clean SIGTERM.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from http_stack import KEY

from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e
START_TIMEOUT_S = 60.0


class Server:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str) -> dict[str, Any]:
        """The first JSON log line whose message matches ``pattern``."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            record = json.loads(line)  # every line is one JSON object
            if re.search(pattern, record["msg"]):
                return record
        raise AssertionError(f"no log line matching {pattern!r}:\n" + "".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code


def test_serve_wires_http_keys_metrics_and_logs(tiny_qwen2_bundle: Path, keys_file: Path) -> None:
    server = Server(
        [
            "--model-dir",
            str(tiny_qwen2_bundle),
            "--port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--api-keys-file",
            str(keys_file),
            "--grace-period-s",
            "2",
            "--log-format",
            "json",
        ]
    )
    try:
        grpc_port = int(re.search(r":(\d+) ", server.wait_for(r"^gRPC listening")["msg"]).group(1))  # type: ignore[union-attr]
        http_url = server.wait_for(r"^HTTP API listening")["url"]
        metrics_port = server.wait_for(r"^metrics listening")["port"]
        server.wait_for(r"^ready")

        client = openai.OpenAI(base_url=f"{http_url}/v1", api_key=KEY, max_retries=0)
        got = client.embeddings.create(
            model="tiny-gte-qwen2", input=["hello", "world"], encoding_format="float"
        )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{http_url}/v1", api_key="sk-nope", max_retries=0).embeddings.create(
                model="tiny-gte-qwen2", input=["hello"]
            )
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = pb_grpc.EmbeddingServiceStub(channel).Embed(
                pb.EmbedRequest(inputs=["hello", "world"], encoding=pb.ENCODING_VALUES),
                metadata=(("authorization", f"Bearer {KEY}"),),
                timeout=10,
            )
        assert [d.embedding for d in got.data] == [
            pytest.approx(list(e.values), abs=0) for e in reply.embeddings
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'embed_requests_total{api="http",code="200",method="embeddings"} 1.0' in metrics
        assert 'embed_requests_total{api="grpc",code="OK",method="Embed"} 1.0' in metrics
        assert "embed_self_test_status 1.0" in metrics
    finally:
        code = server.stop()
    assert code == 0, "".join(server.lines)
    records = [json.loads(line) for line in server.lines]
    access = [r for r in records if r["logger"] == "service.access"]
    assert {(r["api"], r["status"]) for r in access} >= {("http", "200"), ("http", "401"), ("grpc", "OK")}
    assert all({"request_id", "method", "inputs", "tokens", "latency_ms"} <= set(r) for r in access)
    assert any(r["level"] == "info" and r["logger"] == "service.auth" for r in records)
    assert KEY not in "".join(server.lines)
