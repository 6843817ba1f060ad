"""Wire-level gRPC fuzzer (issue 12, "beyond the list"): random and mutated protobuf bytes.

Why bytes and not messages: a client library only sends what its stubs can build; an attacker
sends anything. Every method the server exposes (unary and streaming, embedding, health) gets
raw bytes from three sources: random bytes, valid messages with random field values, and those
messages mutated (bytes flipped, inserted, cut). Each call goes out with no key, the right key,
a wrong key or a malformed ``authorization`` value, with or without an ``x-request-id``.

The invariants, checked after every call:

* a client mistake is never INTERNAL or UNKNOWN (every other status is a legitimate refusal);
* the server still answers its health check (it never dies or wedges);
* (checked by the caller, who owns the log and metrics) the API key never appears in the server's
  log, and the server counted each call under the status the client got.

``tests/service/test_svc_fuzz_wire.py`` runs it bounded in CI against an in-process server;
``python -m bench fuzz`` runs it longer against ``embed-serve`` on MiniLM and reports the figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench._common import Section, table
from service.pb.embedding.v1 import embedding_pb2 as pb

KEY = "fuzz-Secret-Key-4f1c9a"  # the server under test must accept exactly this key
SERVICE = "/embedding.v1.EmbeddingService/"
# (method, streams requests?, a strategy for valid messages of its request type)
_texts = st.text(max_size=24)
_enum = st.one_of(st.integers(0, 6), st.sampled_from([99, 2**31 - 1]))
_embed = st.builds(
    pb.EmbedRequest,
    inputs=st.lists(_texts, max_size=4),
    token_inputs=st.lists(
        st.builds(pb.TokenIds, ids=st.lists(st.integers(0, 2**31 - 1), max_size=6)), max_size=2
    ),
    input_type=_enum,
    task=_texts,
    instruction=_texts,
    encoding=_enum,
    truncation=_enum,
    request_id=st.text(max_size=70),
)
_tokenize = st.builds(
    pb.TokenizeRequest,
    inputs=st.lists(_texts, max_size=4),
    input_type=_enum,
    task=_texts,
    instruction=_texts,
    truncation=_enum,
    request_id=st.text(max_size=70),
    return_tokens=st.booleans(),
)
METHODS: list[tuple[str, bool, st.SearchStrategy[bytes]]] = [
    (SERVICE + "Embed", False, _embed.map(lambda m: m.SerializeToString())),
    (SERVICE + "EmbedStream", True, _embed.map(lambda m: m.SerializeToString())),
    (SERVICE + "Tokenize", False, _tokenize.map(lambda m: m.SerializeToString())),
    (SERVICE + "GetModelInfo", False, st.just(pb.GetModelInfoRequest().SerializeToString())),
    (
        "/grpc.health.v1.Health/Check",
        False,
        st.sampled_from(["", "embedding.v1.EmbeddingService", "nope"]).map(
            lambda s: health_pb2.HealthCheckRequest(service=s).SerializeToString()
        ),
    ),
]
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@st.composite
def _mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "cut", "byte"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "cut":
            del data[at:]
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


def _payload(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=128), valid, _mutated(valid))


_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_auth = st.sampled_from([None, f"Bearer {KEY}", f"bearer {KEY}", "Bearer wrong-key", "Basic abc", "Bearer"])
_metadata = st.tuples(_auth, st.one_of(st.none(), _ascii)).map(
    lambda pair: tuple(
        (k, v) for k, v in (("authorization", pair[0]), ("x-request-id", pair[1])) if v is not None
    )
)
_call = st.sampled_from(range(len(METHODS))).flatmap(
    lambda i: st.tuples(
        st.just(i),
        st.lists(
            _payload(METHODS[i][2]), min_size=0 if METHODS[i][1] else 1, max_size=5 if METHODS[i][1] else 1
        ),
        _metadata,
    )
)


@dataclass
class FuzzReport:
    calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    by_method: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method name, code)
    seconds: float = 0.0


def _health_ok(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def fuzz(target: str, examples: int, *, seed: int | None = None, timeout_s: float = 30.0) -> FuzzReport:
    """Run ``examples`` fuzzed calls against ``target``; raises AssertionError on a broken invariant."""
    report = FuzzReport()
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    started = time.perf_counter()
    with grpc.insecure_channel(target, options=options) as channel:

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=seed is not None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(call=_call)
        def one(call: tuple[int, list[bytes], tuple[tuple[str, str], ...]]) -> None:
            index, payloads, metadata = call
            method, streaming, _ = METHODS[index]
            try:
                if streaming:
                    stream = channel.stream_stream(method)
                    for _ in stream(iter(payloads), metadata=metadata, timeout=timeout_s):
                        pass
                else:
                    channel.unary_unary(method)(payloads[0], metadata=metadata, timeout=timeout_s)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                assert code not in BAD_CODES, (method, code, exc.details(), payloads, metadata)
            report.calls += 1
            report.codes[code.name] += 1
            report.by_method[(method.rsplit("/", 1)[-1], code.name)] += 1
            assert _health_ok(channel), "the server stopped SERVING"

        one()
        assert _health_ok(channel)
    report.seconds = time.perf_counter() - started
    return report


def run(rounds: int, quick: bool) -> Section:
    """``python -m bench fuzz``: embed-serve on MiniLM with an API key, fuzzed for longer than CI.

    ``rounds`` × 2000 calls (``--quick``: 200), each checked as above; then the server's whole log
    (info level) is searched for the key and the process must still be running.
    """
    from bench.service_load import _free_port, _wait_serving, bundle

    section = Section("fuzz", "Wire-level gRPC fuzzing against embed-serve (issue 12, beyond the list)")
    examples = (200 if quick else 2000) * max(1, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        keys, log = Path(tmp) / "keys", Path(tmp) / "server.log"
        keys.write_text(f"{KEY}\n")
        port = _free_port()
        environ = dict(
            os.environ,
            EMBED_MODEL_DIR=str(bundle("minilm", "fp32")),
            EMBED_PORT=str(port),
            EMBED_HOST="127.0.0.1",
            EMBED_API_KEYS_FILE=str(keys),
            EMBED_LOG_LEVEL="info",
        )
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service"], env=environ, stdout=err, stderr=err, text=True
            )
            try:
                _wait_serving(port, proc, time.perf_counter())  # type: ignore[arg-type]
                report = fuzz(f"127.0.0.1:{port}", examples)
                alive = proc.poll() is None
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        text = log.read_text()
    rows = [(code, n) for code, n in report.codes.most_common()]
    section.add(
        f"{report.calls} calls in {report.seconds:.0f} s ({report.calls / report.seconds:.0f}/s) "
        "over the five "
        "methods (random bytes, valid messages with random fields, mutated messages; no key, the key, wrong "
        "keys; random `x-request-id`). Every call ended with a status other than INTERNAL/UNKNOWN and was "
        f"followed by a SERVING health check; server still running: {alive}; key found in the "
        f"{len(text.splitlines())}-line server log: {KEY in text}.\n"
    )
    section.add(table(["status", "calls"], rows))
    if not alive or KEY in text:
        raise AssertionError("fuzz invariant broken: " + ("server died" if not alive else "key logged"))
    return section
