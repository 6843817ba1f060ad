"""OpenAI's embeddings wire format ⇄ the transport-neutral :class:`~service.domain.EmbedJob`.

Why a separate, pure module: the request shape has many small cases (a string, strings, token
ids, lists of token ids; base64 or float output) that are cheapest to test without a server, and
keeping JSON out of ``http.py`` leaves that module about routing, auth and errors only.

Only the structure is checked here (types, enums, unknown fields); the core applies the same
semantic rules as for gRPC (empty inputs, limits, ``dimensions`` policy, token-id range), so both
front ends refuse the same requests with the same messages.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from service.domain import EmbedJob, EmbedResult, InputType, ModelInfo, Truncation
from service.errors import InvalidInput

EncodingFormat = Literal["float", "base64"]

# OpenAI's own fields, then ours (documented in docs/http.md). Anything else is refused, so a
# typo such as "instructions" fails loudly instead of silently embedding without it.
OPENAI_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})
EXTRA_FIELDS = frozenset({"input_type", "task", "instruction", "truncation", "normalize"})
_INPUT_TYPES: tuple[InputType, ...] = ("query", "document")
_TRUNCATIONS: tuple[Truncation, ...] = ("none", "end", "start")
_MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A parsed ``POST /v1/embeddings`` body."""

    job: EmbedJob
    model: str | None
    encoding_format: EncodingFormat


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: list[Any], param: str) -> tuple[int, ...]:
    if not all(_is_int(t) for t in value):
        raise InvalidInput(f"'{param}' must be a list of integer token ids", field=param)
    ids = cast("list[int]", value)
    if any(t < 0 or t > _MAX_TOKEN_ID for t in ids):
        raise InvalidInput(f"'{param}' holds a token id out of range", field=param)
    return tuple(ids)


def _text(value: str, param: str) -> str:
    """JSON allows lone surrogates ("\\ud800"); they are not Unicode text and the tokenizer
    cannot take them, so they are a 400 here rather than a runtime error later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"'{param}' is not valid Unicode (lone surrogate)", field=param) from None
    return value


def parse_input(value: object) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """``input`` as (texts, token_ids); exactly one is non-empty unless the list is empty."""
    if isinstance(value, str):
        return (_text(value, "input"),), ()
    if not isinstance(value, list):
        raise InvalidInput(
            "'input' must be a string, a list of strings, a list of token ids or a list of such lists",
            field="input",
        )
    items: list[Any] = value
    if not items:
        raise InvalidInput("'input' must not be empty", field="input")
    if all(isinstance(x, str) for x in items):
        return tuple(_text(x, f"input[{i}]") for i, x in enumerate(cast("list[str]", items))), ()
    if all(_is_int(x) for x in items):
        return (), (_token_ids(items, "input"),)
    if all(isinstance(x, list) for x in items):
        return (), tuple(_token_ids(cast("list[Any]", x), f"input[{i}]") for i, x in enumerate(items))
    raise InvalidInput("'input' mixes strings, token ids and lists; use one form per request", field="input")


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return value
    if isinstance(value, str):
        return _text(value, name)
    raise InvalidInput(f"'{name}' must be a string", field=name)


def _choice(body: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if value not in allowed:
        raise InvalidInput(f"'{name}' must be one of {', '.join(allowed)}", field=name)
    return cast(str, value)


# Why token ids are opt-in: OpenAI clients (LangChain's OpenAIEmbeddings by default) send
# *tiktoken* ids, which this server would read in its own model's vocabulary: plausible, wrong
# vectors and no error. Only a client that got its ids from this model should send ids.
TOKEN_IDS_REFUSED = (
    "'input' holds token ids, which this server does not accept on HTTP: they would be read in the "
    "served model's vocabulary, not OpenAI's (tiktoken), giving wrong vectors. Send text instead; "
    "with LangChain's OpenAIEmbeddings set check_embedding_ctx_length=False. (The operator can "
    "allow ids of this model's own vocabulary with --http-allow-token-ids.)"
)


def parse_embeddings_request(
    body: object, request_id: str, deadline: float | None = None, *, allow_token_ids: bool = False
) -> EmbeddingsRequest:
    """Validate the JSON body's structure and build the job.

    Raises:
        InvalidInput: with ``field`` set to the offending parameter (OpenAI's ``param``).
    """
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    fields = cast("dict[str, Any]", body)
    unknown = sorted(set(fields) - OPENAI_FIELDS - EXTRA_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown parameter '{unknown[0]}'", field=unknown[0])
    if "input" not in fields:
        raise InvalidInput("'input' is required", field="input")
    texts, token_ids = parse_input(fields["input"])
    if token_ids and not allow_token_ids:
        raise InvalidInput(TOKEN_IDS_REFUSED, field="input")
    encoding = cast(EncodingFormat, _choice(fields, "encoding_format", ("float", "base64")) or "float")
    dimensions = fields.get("dimensions")
    if dimensions is not None and not (_is_int(dimensions) and dimensions >= 1):
        raise InvalidInput("'dimensions' must be a positive integer", field="dimensions")
    normalize = fields.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InvalidInput("'normalize' must be true or false", field="normalize")
    _optional_str(fields, "user")  # accepted for compatibility; not logged (it may be personal data)
    input_type = cast("InputType | None", _choice(fields, "input_type", _INPUT_TYPES))
    job = EmbedJob(
        texts=texts,
        token_ids=token_ids,
        input_type=input_type or "document",
        task=_optional_str(fields, "task"),
        instruction=_optional_str(fields, "instruction"),
        normalize=normalize,
        dimensions=cast("int | None", dimensions),
        truncation=cast("Truncation | None", _choice(fields, "truncation", _TRUNCATIONS)),
        deadline=deadline,
        request_id=request_id,
    )
    return EmbeddingsRequest(job=job, model=_optional_str(fields, "model"), encoding_format=encoding)


def encode_vector(
    vector: np.ndarray[Any, np.dtype[np.float32]], encoding: EncodingFormat
) -> list[float] | str:
    """float: JSON numbers that round-trip to the same float32; base64: little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return cast("list[float]", vector.astype(np.float32).tolist())


def embeddings_response(result: EmbedResult, encoding: EncodingFormat, model: str) -> dict[str, Any]:
    """Exactly OpenAI's response shape (plus nothing else, so strict clients parse it)."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": encode_vector(vec, encoding), "index": i}
            for i, vec in enumerate(result.vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": result.usage.input_tokens, "total_tokens": result.usage.total_tokens},
    }


def model_card(info: ModelInfo, created: int) -> dict[str, Any]:
    """One ``/v1/models`` entry: OpenAI's fields first, then what embedding clients need."""
    return {
        "id": info.model,
        "object": "model",
        "created": created,
        "owned_by": "embedding-service",
        "dimensions": info.dimensions,
        "max_input_tokens": info.max_input_tokens,
        "tasks": sorted(info.tasks),
    }


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
