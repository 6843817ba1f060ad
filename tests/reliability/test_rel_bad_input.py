"""Property-based bad input over every EmbedRequest field (gRPC) and /v1/embeddings field (HTTP).

The oracle lists every rule a request breaks and the status each rule maps to (the one table in
service/errors.py); the server must answer with one of them (200 / OK when none is broken), stay
up (health is checked after every example), and never return a NaN or a wrong-length vector.
Token counts come from the raw ``tokenizers`` library, not from service.tokenizer.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_harness import ThreadedServer, stubs
from rel_toy import DIM, MAX_TOKENS, TASKS, TEMPLATE, VOCAB, toy_tokenizer

from service.encoding import decode, packed_size
from service.logs import is_safe_request_id
from service.pb.embedding.v1 import embedding_pb2 as pb

MAX_INPUTS = 64
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
EXAMPLES = settings(
    max_examples=120,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_TOK = toy_tokenizer()
_TOK.encode_special_tokens = True


def n_tokens(text: str) -> int:
    return len(_TOK.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from rel_toy import build_toy_bundle

    bundle = build_toy_bundle(tmp_path_factory.mktemp("fuzz") / "toy")
    # http_allow_token_ids: the HTTP properties cover token-id inputs too (opt-in on HTTP)
    with ThreadedServer(
        bundle, allow_dimensions=True, max_inputs_per_request=MAX_INPUTS, http_allow_token_ids=True
    ) as live:
        channel = grpc.insecure_channel(live.grpc_target)
        yield live, channel
        channel.close()


def assert_up(channel: grpc.Channel) -> None:
    _, health = stubs(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )


# --- strategies -------------------------------------------------------------------------------
vocab_words = st.sampled_from(["w1", "w2", "cat", "the", ".", ",", "unknownword", "W3"])
texts = st.one_of(
    st.text(max_size=40),  # any Unicode: control characters, NUL, combining marks, emoji…
    st.text(alphabet=st.sampled_from("\x00\x01\x1b\u200b\ufeff\u202e\n\t\r ⏎é漢🙂"), max_size=20),
    st.lists(vocab_words, min_size=0, max_size=40).map(" ".join),
    # exactly at the limit and one past it ([CLS] + n + [SEP])
    st.sampled_from([MAX_TOKENS - 2, MAX_TOKENS - 1]).map(lambda n: " ".join(["w5"] * n)),
    st.integers(1000, 200_000).map(lambda n: "w9 " * n),  # huge
)
input_lists = st.one_of(
    st.lists(texts, max_size=5),
    st.integers(MAX_INPUTS - 1, 3000).map(lambda n: ["w1"] * n),  # up to thousands of inputs
)
token_lists = st.one_of(
    st.just([]),
    st.lists(st.lists(st.integers(0, VOCAB + 5), max_size=MAX_TOKENS), max_size=4),
    st.sampled_from([MAX_TOKENS - 2, MAX_TOKENS - 1]).map(lambda n: [[7] * n]),
)
enum = st.one_of(st.integers(0, 6), st.sampled_from([99, 2**31 - 1]))
strs = st.one_of(st.just(""), st.sampled_from([*list(TASKS), "nope"]), st.text(max_size=30))
dims = st.one_of(st.none(), st.integers(0, 20), st.sampled_from([2**31, 2**32 - 1]))


def rendered(text: str, input_type: str, task: str | None, instruction: str | None) -> tuple[str, int]:
    """What the model sees and how many leading tokens belong to the instruction."""
    if input_type != "query" or not (task or instruction):
        return text, 0
    head = TEMPLATE.partition("{text}")[0].replace("{task}", instruction or TASKS.get(task or "", ""))
    return head + text, n_tokens(head)


def text_rules(
    texts_: list[str], ids: list[list[int]], input_type: str, task: str | None, instruction: str | None,
    truncation: str, count_limit: int, too_many: Any, too_long: Any, invalid: Any,
) -> set[Any]:  # fmt: skip
    broken: set[Any] = set()
    count = len(texts_) or len(ids)
    if texts_ and ids:
        broken.add(invalid)
    if count == 0:
        broken.add(invalid)
    if count > count_limit:
        broken.add(too_many)
    if any(t == "" for t in texts_) or any(not x for x in ids):
        broken.add(invalid)
    if task and instruction:
        broken.add(invalid)
    if task and task not in TASKS:
        broken.add(invalid)
    if ids and (task or instruction):
        broken.add(invalid)
    if any(i >= VOCAB for x in ids for i in x):
        broken.add(invalid)
    room = MAX_TOKENS - 2
    for text in texts_ if count <= count_limit else ():
        full, head = rendered(text, input_type, task if task in TASKS else None, instruction)
        over = n_tokens(full) - room
        if over > 0 and (truncation == "none" or over >= n_tokens(full) - head):
            broken.add(too_long)
    for x in ids:
        if len(x) > room and truncation == "none":
            broken.add(too_long)
    return broken


def check_vectors(vectors: list[np.ndarray], count: int, dimensions: int, normalize: bool) -> None:
    assert len(vectors) == count
    for v in vectors:
        assert v.shape == (dimensions,)
        assert np.isfinite(v).all()
        if normalize:
            assert math.isclose(float(np.linalg.norm(v)), 1.0, abs_tol=1e-3)


# --- gRPC ---------------------------------------------------------------------------------------
ENCODINGS = {0: "values", 1: "values", 2: "float32", 3: "float16", 4: "int8", 5: "binary"}


@EXAMPLES
@given(
    inputs=input_lists, token_inputs=token_lists, input_type=enum, task=strs, instruction=strs,
    normalize=st.one_of(st.none(), st.booleans()), dimensions=dims, truncation=enum, encoding=enum,
    request_id=st.text(max_size=80),
)  # fmt: skip
def test_grpc_embed_request_fields(server, inputs, token_inputs, input_type, task, instruction, normalize,  # type: ignore[no-untyped-def]
                                   dimensions, truncation, encoding, request_id) -> None:  # fmt: skip
    live, channel = server
    stub, _ = stubs(channel)
    request = pb.EmbedRequest(
        inputs=inputs, token_inputs=[pb.TokenIds(ids=x) for x in token_inputs], input_type=input_type,
        task=task, instruction=instruction, truncation=truncation, encoding=encoding, request_id=request_id,
    )  # fmt: skip
    if normalize is not None:
        request.normalize = normalize
    if dimensions is not None:
        request.dimensions = dimensions
    broken: set[grpc.StatusCode] = set()
    if input_type > 2 or truncation > 3 or encoding > 5:
        broken.add(INVALID)
    if encoding == 4 and normalize is False:
        broken.add(INVALID)
    if dimensions is not None and not 1 <= dimensions <= DIM:
        broken.add(INVALID)
    if request_id and not is_safe_request_id(request_id):
        broken.add(INVALID)  # the one request-id rule (service.logs), checked before any work
    mode = {0: "none", 1: "none", 2: "end", 3: "start"}.get(truncation, "none")
    kind = "query" if input_type == 1 else "document"
    broken |= text_rules(
        list(inputs),
        token_inputs,
        kind,
        task or None,
        instruction or None,
        mode,
        MAX_INPUTS,
        INVALID,
        INVALID,
        INVALID,
    )
    if request.ByteSize() > live.settings.max_message_bytes:
        broken = {grpc.StatusCode.RESOURCE_EXHAUSTED}
    try:
        reply = stub.Embed(request, timeout=30)
        code = OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert code != grpc.StatusCode.INTERNAL, exc.details()
    assert code in (broken or {OK}), (code, broken)
    if code == OK:
        d = dimensions or DIM
        enc = ENCODINGS[encoding]
        if enc == "values":
            vectors = [np.asarray(e.values, dtype=np.float32) for e in reply.embeddings]
        else:
            assert all(len(e.packed) == packed_size(enc, d) for e in reply.embeddings)
            vectors = [decode(e.packed, enc, d) for e in reply.embeddings]
        check_vectors(
            vectors,
            len(inputs) or len(token_inputs),
            d,
            normalize is not False and enc in ("values", "float32"),
        )
        assert [e.index for e in reply.embeddings] == list(range(len(vectors)))
        if request_id:
            assert reply.request_id == request_id
    assert_up(channel)


def test_grpc_malformed_bytes_are_refused_and_server_stays_up(server) -> None:  # type: ignore[no-untyped-def]
    """Invalid UTF-8 in a string field (a lone surrogate encoded as bytes) and corrupt wire data.

    grpcio decodes before the servicer runs; service/wire.py turns the decode failure into
    INVALID_ARGUMENT (grpcio alone answers UNKNOWN)."""
    _, channel = server
    raw = channel.unary_unary("/embedding.v1.EmbeddingService/Embed")
    good = pb.EmbedRequest(inputs=["abc"]).SerializeToString()
    for body in (good.replace(b"abc", b"a\xffc"), good.replace(b"abc", b"\xed\xa0\x80"), b"\xff\xff\xff\xff"):
        with pytest.raises(grpc.RpcError) as err:
            raw(body, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert_up(channel)


def test_grpc_malformed_stream_message_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    """A corrupt message inside EmbedStream ends the stream with INVALID_ARGUMENT after the good ones."""
    _, channel = server
    raw = channel.stream_stream("/embedding.v1.EmbeddingService/EmbedStream")
    good = pb.EmbedRequest(inputs=["abc"]).SerializeToString()
    replies = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in raw(iter([good, b"\xff\xff\xff\xff"]), timeout=30):
            replies.append(pb.EmbedResponse.FromString(reply))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert len(replies) <= 1
    assert_up(channel)


# --- HTTP ---------------------------------------------------------------------------------------
def post(port: int, body: bytes) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def http_up(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=5), st.just({})
)
http_input = st.one_of(
    texts, input_lists, token_lists.filter(bool), st.lists(st.integers(-2, VOCAB + 2), max_size=40),
    junk, st.lists(st.one_of(st.text(max_size=3), st.integers(0, 9)), min_size=2, max_size=3),
)  # fmt: skip
MISSING = object()


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(MISSING), strategy)


@EXAMPLES
@given(
    input_=opt(http_input), model=opt(st.one_of(st.just("toy-mean"), st.text(max_size=8), junk)),
    encoding_format=opt(st.one_of(st.sampled_from(["float", "base64", "int8"]), junk)),
    dimensions=opt(st.one_of(dims, st.just(10**30), junk)), user=opt(st.one_of(st.text(max_size=8), junk)),
    input_type=opt(st.one_of(st.sampled_from(["query", "document", "QUERY"]), junk)),
    task=opt(st.one_of(strs, junk)), instruction=opt(st.one_of(strs, junk)),
    truncation=opt(st.one_of(st.sampled_from(["none", "end", "start", "middle"]), junk)),
    normalize=opt(st.one_of(st.booleans(), junk)), extra=st.booleans(),
)  # fmt: skip
def test_http_embeddings_fields(server, input_, model, encoding_format, dimensions, user, input_type, task,  # type: ignore[no-untyped-def]
                                instruction, truncation, normalize, extra) -> None:  # fmt: skip
    live, _ = server
    fields = {
        "input": input_, "model": model, "encoding_format": encoding_format, "dimensions": dimensions,
        "user": user, "input_type": input_type, "task": task, "instruction": instruction,
        "truncation": truncation, "normalize": normalize,
    }  # fmt: skip
    body = {k: v for k, v in fields.items() if v is not MISSING}
    if extra:
        body["instructions"] = "typo"
    broken: set[int] = set()
    if extra:
        broken.add(400)

    def is_str_or_none(v: Any) -> bool:
        return v is MISSING or v is None or isinstance(v, str)

    texts_: list[str] = []
    ids: list[list[int]] = []
    if input_ is MISSING:
        broken.add(400)
    elif isinstance(input_, str):
        texts_ = [input_]
    elif isinstance(input_, list) and input_ and all(isinstance(x, str) for x in input_):
        texts_ = input_
    elif isinstance(input_, list) and input_ and all(type(x) is int for x in input_):
        ids = [input_]
    elif isinstance(input_, list) and input_ and all(isinstance(x, list) for x in input_):
        ids = input_
    else:
        broken.add(400)
    if any(type(i) is not int or i < 0 for x in ids for i in x):
        broken.add(400)
        ids = [[0]]
    if encoding_format not in (MISSING, None, "float", "base64"):
        broken.add(400)
    positive = type(dimensions) is int and dimensions >= 1
    if (dimensions not in (MISSING, None) and not positive) or (positive and dimensions > DIM):
        broken.add(400)
    if normalize is not MISSING and not isinstance(normalize, bool):
        broken.add(400)
    for _name, value, allowed in (
        ("input_type", input_type, ("query", "document")),
        ("truncation", truncation, ("none", "end", "start")),
    ):
        if value not in (MISSING, None) and value not in allowed:
            broken.add(400)
    if not (is_str_or_none(user) and is_str_or_none(task) and is_str_or_none(instruction)):
        broken.add(400)
    if not is_str_or_none(model) or model not in (MISSING, None, "toy-mean"):
        broken.add(404 if isinstance(model, str) else 400)
    if texts_ or ids:
        t = task if isinstance(task, str) and task else None
        i = instruction if isinstance(instruction, str) and instruction else None
        mode = truncation if truncation in ("end", "start") else "none"
        kind = "query" if input_type == "query" else "document"
        broken |= text_rules(texts_, ids, kind, t, i, mode, MAX_INPUTS, 413, 413, 400)
    raw = json.dumps(body).encode()
    if len(raw) > 4 * live.settings.max_message_bytes:
        broken = {413}
    status, reply = post(live.http_port, raw)
    assert status != 500, reply
    assert status in (broken or {200}), (status, broken, reply)
    if status == 200:
        count = len(texts_) or len(ids)
        d = dimensions if type(dimensions) is int else DIM
        if encoding_format == "base64":
            vectors = [np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4") for e in reply["data"]]
        else:
            vectors = [np.asarray(e["embedding"], dtype=np.float32) for e in reply["data"]]
        check_vectors(vectors, count, d, normalize is not False)
    else:
        assert set(reply["error"]) == {"message", "type", "param", "code"}
    http_up(live.http_port)


@pytest.mark.parametrize(
    "body",
    [
        b'{"input": "a\\ud800b"}',  # escaped lone high surrogate
        b'{"input": ["ok", "\\udc00"]}',  # escaped lone low surrogate
        b'{"input": "\xed\xa0\x80"}',  # a surrogate encoded as raw (invalid) UTF-8 bytes
        b'{"input": "w1", "instruction": "\\ud83d", "input_type": "query"}',
        b'{"input": "a\xffb"}',  # invalid UTF-8
        b'{"input": "w1\\u0000\\u0001"}',  # NUL and a control character: valid text, embedded
        b"NaN",
        b'{"input": "w1", "dimensions": NaN}',
        b'{"input": "w1", "dimensions": 1e400}',
        b"\x00\x00\x00",
        b"",
    ],
)
def test_http_raw_bodies(server, body: bytes) -> None:  # type: ignore[no-untyped-def]
    live, _ = server
    status, reply = post(live.http_port, body)
    expected = 200 if b"\\u0000" in body else 400
    assert status == expected, (body, status, reply)
    http_up(live.http_port)
