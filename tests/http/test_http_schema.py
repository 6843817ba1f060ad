"""The OpenAI request/response mapping, without a server (property tests where shapes vary)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain import EmbedResult, Timings, Tokenized, Usage
from service.errors import InvalidInput
from service.http_schema import (
    embeddings_response,
    encode_vector,
    error_body,
    parse_embeddings_request,
    parse_input,
)


def test_input_forms() -> None:
    assert parse_input("a") == (("a",), ())
    assert parse_input(["a", "b"]) == (("a", "b"), ())
    assert parse_input([1, 2, 3]) == ((), ((1, 2, 3),))
    assert parse_input([[1, 2], [3]]) == ((), ((1, 2), (3,)))


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ([], "input"),
        (["a", 1], "input"),
        ([1, "a"], "input"),
        ([[1], "a"], "input"),
        ([True, 2], "input"),
        ([[1, -1]], "input[0]"),
        ([[1], [2.5]], "input[1]"),
        (3, "input"),
        ({"text": "a"}, "input"),
        (None, "input"),
    ],
)
def test_bad_input_names_the_param(value: object, param: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_input(value)
    assert info.value.field == param


def test_request_fields_reach_the_job() -> None:
    req = parse_embeddings_request(
        {
            "input": ["q"],
            "model": "m",
            "encoding_format": "base64",
            "dimensions": 8,
            "user": "u-1",
            "input_type": "query",
            "task": "retrieval",
            "truncation": "end",
            "normalize": False,
        },
        "rid",
    )
    job = req.job
    assert (req.model, req.encoding_format) == ("m", "base64")
    assert (
        job.texts,
        job.input_type,
        job.task,
        job.dimensions,
        job.truncation,
        job.normalize,
        job.request_id,
    ) == (
        ("q",),
        "query",
        "retrieval",
        8,
        "end",
        False,
        "rid",
    )
    defaults = parse_embeddings_request({"input": "d"}, "r").job
    assert (defaults.input_type, defaults.truncation, defaults.dimensions, defaults.normalize) == (
        "document",
        None,
        None,
        True,
    )
    assert parse_embeddings_request({"input": "d"}, "r").encoding_format == "float"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([1], None),
        ({}, "input"),
        ({"input": "a", "encoding_format": "float16"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": "8"}, "dimensions"),
        ({"input": "a", "dimensions": True}, "dimensions"),
        ({"input": "a", "input_type": "passage"}, "input_type"),
        ({"input": "a", "truncation": "middle"}, "truncation"),
        ({"input": "a", "instructions": "x"}, "instructions"),
        ({"input": "a", "model": 3}, "model"),
        ({"input": "a", "user": 3}, "user"),
        ({"input": "a", "normalize": "yes"}, "normalize"),
        ({"input": "a", "task": ["x"]}, "task"),
    ],
)
def test_bad_request_bodies(body: object, param: str | None) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_embeddings_request(body, "r")
    assert info.value.field == param


@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64))
def test_float_and_base64_encode_the_same_float32_values(values: list[float]) -> None:
    vec = np.asarray(values, dtype=np.float32)
    as_floats = np.asarray(encode_vector(vec, "float"), dtype=np.float32)
    encoded = encode_vector(vec, "base64")
    assert isinstance(encoded, str)
    as_b64 = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_array_equal(as_floats, vec)
    np.testing.assert_array_equal(as_b64, vec)


def test_response_has_exactly_openais_shape() -> None:
    result = EmbedResult(
        vectors=np.eye(2, dtype=np.float32),
        inputs=(Tokenized((1, 2)), Tokenized((3,), dropped_tokens=1)),
        usage=Usage(input_tokens=3, truncated_inputs=1),
        timings=Timings(),
        model="m",
        request_id="r",
    )
    body = embeddings_response(result, "float", "served")
    assert body == {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": [1.0, 0.0], "index": 0},
            {"object": "embedding", "embedding": [0.0, 1.0], "index": 1},
        ],
        "model": "served",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    assert error_body("m", "t", None, "c") == {
        "error": {"message": "m", "type": "t", "param": None, "code": "c"}
    }
