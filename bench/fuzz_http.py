"""A byte-level HTTP fuzzer against a real ``embed-serve`` process (issue 12, "Beyond the list").

Why bytes over a raw socket and not a client library: libraries normalise exactly what an
attacker would not (header case and order, duplicate headers, Content-Length, chunk framing,
encodings, non-UTF-8 bytes). Each example is one request (method, path, version, headers,
body, framing) drawn by hypothesis; the invariants after each:

* no 5xx: a request is a client's doing, so every answer is 2xx/4xx (never 500, 502, ...);
* the server never dies, and ``GET /health`` still answers 200;
* it never hangs: the connection ends within the configured timeouts;
* at the end, the process's log (debug level) holds no API key and no error-level line.

``tests/http/test_http_fuzz.py`` runs a bounded, derandomised number of examples in CI;
``python -m bench fuzz_http`` runs longer and writes the figures to docs/reliability.md.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import secrets
import socket
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from bench._common import Section, table
from bench.soak import Server, start_server

MODEL = "tiny-gte-qwen2"
TIMEOUT_S = 0.5  # the server's keep-alive and body timeouts while fuzzing: stalls end fast
READ_LIMIT_S = 30.0  # a connection still open this long after the request is a hang
_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


@dataclass(frozen=True)
class Keys:
    valid: str = field(default_factory=lambda: "sk-fuzz-" + secrets.token_hex(12))
    wrong: str = field(default_factory=lambda: "sk-wrong-" + secrets.token_hex(12))


# --- strategies ------------------------------------------------------------------------------------

_TEXT = st.text(max_size=40)
_IDS = st.lists(st.integers(-3, 300_000), max_size=6)
_INPUT = st.one_of(
    _TEXT,
    st.lists(_TEXT, max_size=5),
    _IDS,
    st.lists(_IDS, max_size=4),
    st.none(),
    st.integers(),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(), st.text(max_size=12))
_REQUEST = st.fixed_dictionaries(
    {"input": _INPUT},
    optional={
        "model": st.sampled_from([MODEL, "text-embedding-ada-002", ""]) | _SCALAR,
        "encoding_format": st.sampled_from(["float", "base64", "int8"]) | _SCALAR,
        "dimensions": _SCALAR,
        "input_type": st.sampled_from(["query", "document", "x"]) | _SCALAR,
        "truncation": st.sampled_from(["none", "end", "start", "END"]) | _SCALAR,
        "normalize": _SCALAR,
        "task": _SCALAR,
        "instruction": _SCALAR,
        "user": _SCALAR,
        "extra": _SCALAR,
    },
)


def _nested(depth: int, kind: int) -> bytes:
    opener, closer = (b"[", b"]") if kind == 0 else (b'{"a":', b"}")
    return b'{"input": "x", "user": ' + opener * depth + b"1" + closer * depth + b"}"


_JSON_BODY = _REQUEST.map(lambda d: json.dumps(d, allow_nan=True).encode())
_BODY = st.one_of(
    _JSON_BODY,
    _JSON_BODY.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # truncated
    st.binary(max_size=200),
    st.builds(_nested, st.integers(1, 20_000), st.integers(0, 1)),
    st.sampled_from(
        [b"", b"null", b"[]", b'{"input": "\\ud800"}', b'{"input": NaN}', b"\xff\xfe{}", b"{" * 3]
    ),
)
# (Content-Encoding header or None, how the body is transformed)
_ENCODINGS = st.sampled_from(
    [
        (None, "plain"),
        ("gzip", "gzip"),
        ("deflate", "zlib"),
        ("deflate", "raw"),
        ("gzip", "plain"),  # a lie
        ("deflate", "plain"),
        ("identity", "plain"),
        ("br", "plain"),
        ("zstd", "plain"),
        ("gzip, gzip", "gzip2"),
        ("GZIP", "gzip"),
        ("gzip", "bomb"),
        ("compress", "plain"),
    ]
)
_HEADER_VALUE = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_CONTENT_TYPES = (
    st.sampled_from(
        [
            b"application/json",
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
        ]
    )
    | _HEADER_VALUE
)
_FRAMINGS = st.sampled_from(
    [
        "length",
        "none",
        "longer",
        "shorter",
        "negative",
        "garbage",
        "two",
        "chunked",
        "chunked-bad",
        "chunked-open",
        "te-gzip",
    ]
)
_METHODS = st.sampled_from(
    [b"POST", b"GET", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"post"]
) | st.binary(min_size=1, max_size=8).map(
    lambda b: b.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"") or b"X"
)
_PATHS = st.sampled_from(
    [
        b"/v1/embeddings",
        b"/v1/embeddings?x=1",
        b"/v1/models",
        b"/v1/models/" + MODEL.encode(),
        b"/v1/models/%00",
        b"/health",
        b"/metrics",
        b"/",
        b"//v1/embeddings",
        b"/v1/../v1/embeddings",
        b"*",
        b"/v1/embeddings#frag",
    ]
) | _HEADER_VALUE.map(lambda b: b"/" + b.replace(b" ", b"%20"))
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1", b"http/1.1"])


def _auth(keys: Keys) -> st.SearchStrategy[list[bytes]]:
    valid, wrong = keys.valid.encode(), keys.wrong.encode()
    return st.sampled_from(
        [
            [],
            [b"Bearer " + valid],
            [b"bearer   " + valid + b"  "],
            [b"Bearer " + wrong],
            [b"Bearer"],
            [b"Basic " + valid],
            [valid],
            [b"Bearer " + valid + "é".encode()],
            [b"Bearer \xff\xfe"],
            [b"Bearer " + valid, b"Bearer " + valid],
            [b"Bearer " + valid, b"Bearer " + wrong],
        ]
    )


def _encode(body: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(body)
    if how == "gzip2":
        return gzip.compress(gzip.compress(body))
    if how == "zlib":
        return zlib.compress(body)
    if how == "raw":
        return zlib.compress(body)[2:-4]
    if how == "bomb":
        return _bomb()
    return body


@functools.cache
def _bomb() -> bytes:
    """64 MiB of JSON in ~64 KiB of gzip (compressed once: it takes a while)."""
    return gzip.compress(b'{"input": "' + b"a" * (64 << 20) + b'"}', compresslevel=9)


def _chunked(body: bytes, how: str) -> bytes:
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    if how == "chunked-bad":
        return out + b"zz\r\nxx\r\n0\r\n\r\n"
    if how == "chunked-open":
        return out  # no terminating chunk: the body timeout must end it
    return out + b"0\r\n\r\n"


@st.composite
def http_requests(draw: st.DrawFn, keys: Keys) -> bytes:
    """One raw HTTP/1.x request: half of them well-formed up to the JSON, so that the fuzzing
    reaches the app and the core instead of stopping at the parser or the key check."""
    sane = draw(st.booleans())
    if sane:
        method, path, version = b"POST", b"/v1/embeddings", b"HTTP/1.1"
        encoding, how = draw(st.sampled_from([(None, "plain"), ("gzip", "gzip"), ("deflate", "zlib")]))
        body = _encode(draw(_JSON_BODY | st.just(b'{"input": ["hello", "world"]}')), how)
        auth = [b"Bearer " + keys.valid.encode()]
    else:
        method, path, version = draw(_METHODS), draw(_PATHS), draw(_VERSIONS)
        encoding, how = draw(_ENCODINGS)
        body = _encode(draw(_BODY), how)
        auth = draw(_auth(keys))
    headers: list[bytes] = [b"Host: fuzz"]
    headers += [b"Authorization: " + v for v in auth]
    if draw(st.booleans()):
        headers.append(b"Content-Type: " + draw(_CONTENT_TYPES))
    if encoding is not None:
        headers.append(b"Content-Encoding: " + encoding.encode())
    if draw(st.booleans()):
        headers.append(b"X-Request-Id: " + draw(_HEADER_VALUE | st.just(b"fuzz-1")))
    if draw(st.integers(0, 3)) == 0:
        timeout = draw(st.sampled_from([b"0.000001", b"30", b"-1", b"nan", b"1e99"]) | _HEADER_VALUE)
        headers.append(b"X-Request-Timeout: " + timeout)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.from_regex(rb"\A[A-Za-z0-9-]{1,16}\Z"))
        headers.append(name + b": " + draw(_HEADER_VALUE))
    if draw(st.integers(0, 4)):  # mostly close: a kept-alive connection costs the keep-alive timeout
        headers.append(b"Connection: close")
    framing = "length" if sane else draw(_FRAMINGS)
    if framing.startswith("chunked"):
        headers.append(b"Transfer-Encoding: chunked")
        body = _chunked(body, framing)
    elif framing == "te-gzip":
        headers.append(b"Transfer-Encoding: gzip")
    elif framing != "none":
        length = {"longer": len(body) + 5, "shorter": max(0, len(body) - 3)}.get(framing, len(body))
        value = {"negative": b"-1", "garbage": b"12a"}.get(framing, str(length).encode())
        headers.append(b"Content-Length: " + value)
        if framing == "two":
            headers.append(b"Content-Length: " + str(length + 1).encode())
    head = method + b" " + path + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n"
    return head + body


# --- the target --------------------------------------------------------------------------------------


@dataclass
class Target:
    server: Server
    keys: Keys
    log: Path
    statuses: Counter[str] = field(default_factory=Counter)
    examples: int = 0

    def send(self, request: bytes, count: bool = True) -> list[int]:
        """Send one request; every status line that came back before the server closed."""
        data = b""
        with socket.create_connection(("127.0.0.1", self.server.http_port), timeout=READ_LIMIT_S) as sock:
            try:
                sock.sendall(request)
                started = time.monotonic()
                while time.monotonic() - started < READ_LIMIT_S:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                else:
                    raise AssertionError(f"connection still open after {READ_LIMIT_S} s")
            except (ConnectionResetError, BrokenPipeError):
                pass  # the server may reset a connection whose bytes it refused; not a failure
            except TimeoutError:
                raise AssertionError(f"no answer and no close within {READ_LIMIT_S} s") from None
        codes = [int(m) for m in _STATUS.findall(data)]
        if count:
            self.examples += 1
            self.statuses.update(str(c) for c in codes or ["closed"])
        return codes

    def shown(self, request: bytes) -> str:
        """The request for a failure message, with the key masked (failure output is a log too)."""
        return repr(request[:300].replace(self.keys.valid.encode(), b"<key>"))

    def check(self, request: bytes) -> None:
        """The invariants for one example."""
        codes = self.send(request)
        # 504 is the documented answer to a deadline the client itself set (X-Request-Timeout).
        allowed = {504} if b"x-request-timeout:" in request.lower() else set()
        bad = [c for c in codes if c >= 500 and c not in allowed]
        assert not bad, f"{bad} for {self.shown(request)}"
        assert self.server.proc.poll() is None, f"the server died on {self.shown(request)}"
        health = self.send(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", count=False)
        assert health == [200], f"health {health} after {self.shown(request)}"

    def check_log(self) -> None:
        text = self.log.read_text(errors="replace")
        for secret in (self.keys.valid, self.keys.wrong):
            assert secret not in text, "an API key reached the log"
        errors = [line for line in text.splitlines() if re.search(r'"level": "(error|critical)"', line)]
        assert not errors, "error-level log lines:\n" + "\n".join(errors[:5])


@contextmanager
def target(bundle: Path, workdir: Path, keys: Keys) -> Iterator[Target]:
    """``embed-serve`` with keys on, debug logs, short HTTP timeouts; stopped (SIGTERM) at the end."""
    keys_file = workdir / "api-keys"
    keys_file.write_text(f"{keys.valid}\n")
    log = workdir / "fuzz-server.log"
    extra = [
        "--api-keys-file", str(keys_file), "--log-level", "debug", "--intra-op-threads", "1",
        "--http-keepalive-timeout-s", str(TIMEOUT_S), "--http-body-timeout-s", str(TIMEOUT_S),
        "--max-message-bytes", str(1 << 20), "--http-allow-token-ids",
    ]  # fmt: skip
    server = start_server(bundle, log, extra)
    try:
        yield Target(server, keys, log)
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


# --- python -m bench fuzz_http -----------------------------------------------------------------------


def tiny_bundle() -> Path:
    """The tiny gte-Qwen2 bundle the tests use, exported once into the bench cache."""
    from bench._models import CACHE
    from export.api import export_bundle
    from export.assets import build_tiny_qwen2

    out = CACHE / "bundles" / "tiny-gte-qwen2-fp32"
    if not (out / "manifest.json").exists():
        checkpoint = build_tiny_qwen2(CACHE / "ckpt-tiny-gte-qwen2", seed=0)
        export_bundle(checkpoint, out, "fp32", overwrite=True, model_id=MODEL)
    return out


def run(rounds: int, quick: bool) -> Section:
    """``rounds`` × 500 examples (100 with ``--quick``), fresh randomness, one server for all."""
    import tempfile

    from hypothesis import HealthCheck, given, settings

    examples = rounds * (100 if quick else 500)
    keys = Keys()
    section = Section("fuzz_http", "HTTP fuzzer (issue 12)")
    with tempfile.TemporaryDirectory() as tmp, target(tiny_bundle(), Path(tmp), keys) as t:
        started = time.monotonic()

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=http_requests(keys))
        def fuzz(request: bytes) -> None:
            t.check(request)

        fuzz()
        elapsed = time.monotonic() - started
        t.server.proc.terminate()
        t.server.proc.wait(30)
        t.check_log()
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(t.statuses.items()))
    section.add(
        f"`embed-serve` on the tiny gte-Qwen2 bundle (keys on, debug logs, keep-alive and body "
        f"timeouts {TIMEOUT_S:g} s), one raw-socket request per example, `GET /health` after each. "
        f"Invariants: no 5xx, the process alive, health 200, no hang past {READ_LIMIT_S:g} s, and "
        "afterwards no API key and no error-level line in the log.\n"
    )
    section.add(
        table(
            ["examples", "wall time", "examples/s", "statuses seen", "invariant failures"],
            [[t.examples, f"{elapsed:.0f} s", f"{t.examples / elapsed:.1f}", statuses, 0]],
        )
    )
    return section
