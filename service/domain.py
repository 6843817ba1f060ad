"""Transport-neutral request and result types: what both front ends hand to the core.

Why separate from the proto: the gRPC servicer and the OpenAI-compatible HTTP facade are thin
adapters that translate their wire format into these types and back, so the core never sees a
protobuf or an HTTP body, and each front end can be tested against the same semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from bundle.manifest import InputType as InputType  # one definition, shared with the export

Truncation = Literal["none", "end", "start"]
# The one list of encodings; the gRPC servicer maps its enum onto these names (``ENCODINGS``).
Encoding = Literal["values", "float32", "float16", "int8", "binary"]
CoreState = Literal["starting", "ready", "stalled", "draining", "stopped", "failed"]

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EmbedJob:
    """One embedding request.

    Exactly one of ``texts`` and ``token_ids`` is non-empty. ``token_ids`` are content ids (as the
    OpenAI API accepts them): the model's prefix/suffix ids are added and truncation applies, but
    no instruction. ``deadline`` is a ``time.monotonic()`` instant; work still queued after it is
    dropped and never computed. ``truncation=None`` means the server default.
    """

    texts: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    input_type: InputType = "document"
    task: str | None = None
    instruction: str | None = None
    normalize: bool = True
    dimensions: int | None = None
    truncation: Truncation | None = None
    deadline: float | None = None
    request_id: str = ""
    # The served model (name or alias) to use; None: the default (first) model.
    model: str | None = None

    @property
    def count(self) -> int:
        return len(self.texts) or len(self.token_ids)


@dataclass(frozen=True)
class TokenizeJob:
    texts: tuple[str, ...]
    input_type: InputType = "document"
    task: str | None = None
    instruction: str | None = None
    truncation: Truncation | None = None
    request_id: str = ""
    return_tokens: bool = False
    model: str | None = None


@dataclass(frozen=True)
class Tokenized:
    """One input as the model sees it: prefix ids + (instruction +) content + suffix ids."""

    ids: tuple[int, ...]
    dropped_tokens: int = 0

    @property
    def truncated(self) -> bool:
        return self.dropped_tokens > 0

    @property
    def token_count(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    truncated_inputs: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens


@dataclass(frozen=True)
class Timings:
    """Milliseconds. queue: admission → first batch start; inference: first start → last end."""

    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class EmbedResult:
    """Per input (in request order): a float32 vector after normalize/dimensions, and counts."""

    vectors: FloatArray  # [n, dims]
    inputs: tuple[Tokenized, ...]
    usage: Usage
    timings: Timings
    model: str
    request_id: str

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class TokenizeResult:
    inputs: tuple[Tokenized, ...]
    tokens: tuple[tuple[str, ...], ...]
    model: str
    request_id: str

    @property
    def total_tokens(self) -> int:
        return sum(t.token_count for t in self.inputs)


@dataclass(frozen=True)
class SelfTestResult:
    ran: bool
    passed: bool
    vectors: int = 0
    min_cosine: float = 0.0
    threshold: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Limits:
    max_inputs_per_request: int
    max_input_tokens: int
    max_batch_tokens: int
    max_batch_size: int
    max_queue_tokens: int
    max_message_bytes: int
    default_truncation: Truncation
    allow_dimensions: bool


@dataclass(frozen=True)
class ModelInfo:
    """Everything GetModelInfo (and the HTTP /v1/models) reports; read from the manifest."""

    model: str
    model_id: str
    source_kind: str
    source_id: str
    source_revision: str | None
    family: str
    model_type: str
    dimensions: int
    max_input_tokens: int
    pooling: str
    attention: str
    precision: str
    execution_providers: tuple[str, ...]
    bundle_sha256: str
    tasks: dict[str, str]
    default_task: str | None
    query_template: str | None
    limits: Limits
    validation: dict[str, float | int | str | bool]
    self_test: SelfTestResult
    batch_invariant: bool
    matryoshka: bool
    encodings: tuple[Encoding, ...] = get_args(Encoding)
