"""``EmbeddingCore``: the transport-neutral service. Both front ends are thin adapters over it.

Why one core: validation, the instruction/truncation policy, batching, post-processing and
readiness must behave identically for gRPC and the OpenAI-compatible HTTP API. Adapters turn
their wire format into :class:`~service.domain.EmbedJob` and results back; errors are raised as
:mod:`service.errors` classes and mapped by each front end from the one table.

Lifecycle: ``starting`` (bundle verified, session created, warm-up, self-test — in a thread, so
health checks keep answering NOT_SERVING) → ``ready`` → ``draining`` (new work refused, accepted
work finishes) → ``stopped``; ``failed`` when start-up failed. Listeners (health services,
metrics) are told of every change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from bundle.manifest import MANIFEST_NAME, BundleError, Manifest, file_sha256, load_manifest, verify_files
from service.batcher import Batcher, BatchObserver
from service.cost import CostModel
from service.domain import (
    CoreState,
    EmbedJob,
    EmbedResult,
    Limits,
    ModelInfo,
    SelfTestResult,
    Timings,
    Tokenized,
    TokenizeJob,
    TokenizeResult,
    Usage,
)
from service.encoding import check_dimensions, postprocess
from service.errors import (
    DeadlineExceeded,
    Draining,
    EmbeddingError,
    InvalidInput,
    NotReady,
    RuntimeFailure,
    TooManyInputs,
)
from service.logs import new_request_id
from service.runtime import OrtRuntime, Runtime, StartupError
from service.selftest import cosine_threshold, self_test, warm_up
from service.settings import Settings
from service.tokenizer import TextTokenizer

log = logging.getLogger("service.core")

RuntimeFactory = Callable[[Settings, Manifest, Path, int], Runtime]
StateListener = Callable[[CoreState], None]
ResultListener = Callable[[EmbedResult], None]


def ort_runtime(settings: Settings, manifest: Manifest, directory: Path, max_input_tokens: int) -> Runtime:
    return OrtRuntime(settings, manifest, directory, max_input_tokens=max_input_tokens)


class EmbeddingCore:
    """Loads a bundle and serves embed / tokenize / model_info; owns the batcher."""

    def __init__(
        self,
        settings: Settings,
        *,
        runtime_factory: RuntimeFactory = ort_runtime,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.settings = settings
        self._runtime_factory = runtime_factory
        self._on_batch = on_batch
        self._state: CoreState = "starting"
        self._listeners: list[StateListener] = []
        self._result_listeners: list[ResultListener] = []
        self._active = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        # Tokenisation threads: encode_batch is Rust and releases the GIL; two keep the loop free
        # without competing with the runtime thread for the cores.
        self._tok_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embed-tokenize")
        self._manifest: Manifest | None = None
        self._tokenizer: TextTokenizer | None = None
        self._runtime: Runtime | None = None
        self._batcher: Batcher | None = None
        self._bundle_sha256 = ""
        self._self_test = SelfTestResult(ran=False, passed=False, message="not run yet")
        self.max_input_tokens = 0
        self._cost: CostModel | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    @property
    def state(self) -> CoreState:
        return self._state

    @property
    def serving(self) -> bool:
        return self._state == "ready"

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise NotReady("the model is still loading")
        return self._batcher

    def add_state_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)
        listener(self._state)

    def add_result_listener(self, listener: ResultListener) -> None:
        """Called with every embed result, whatever the front end (stage timings, truncation)."""
        self._result_listeners.append(listener)

    def _set_state(self, state: CoreState) -> None:
        self._state = state
        log.info("core state: %s", state)
        for listener in self._listeners:
            listener(state)

    async def start(self) -> None:
        """Verify and load the bundle, warm up, self-test, then serve. Raises StartupError."""
        try:
            await asyncio.to_thread(self._load)
        except (BundleError, StartupError, ValueError, OSError) as exc:
            self._set_state("failed")
            raise StartupError(str(exc)) from exc
        except Exception as exc:
            self._set_state("failed")
            raise StartupError(f"unexpected start-up failure: {exc!r}") from exc
        assert self._runtime is not None and self._manifest is not None
        self._batcher = Batcher(
            self._runtime,
            max_batch_tokens=self.settings.max_batch_tokens,
            cost=self._cost,
            max_padding_ratio=self.settings.max_padding_ratio,
            max_batch_size=self.settings.max_batch_size,
            max_batch_wait_ms=self.settings.max_batch_wait_ms,
            max_queue_tokens=self.settings.max_queue_tokens,
            pad_id=self._manifest.tokenizer.pad_id,
            batch_invariant=self._manifest.batch_invariant,
            on_batch=self._on_batch,
        )
        self._batcher.start()
        self._set_state("ready")

    def _load(self) -> None:
        settings = self.settings
        directory = settings.model_dir
        manifest = load_manifest(directory)
        verify_files(directory, manifest)
        self._bundle_sha256 = file_sha256(directory / MANIFEST_NAME)
        limit = manifest.max_input_tokens
        if settings.max_input_tokens is not None:
            if settings.max_input_tokens > limit:
                log.warning(
                    "max_input_tokens=%d exceeds the model's %d; using %d",
                    settings.max_input_tokens,
                    limit,
                    limit,
                )
            limit = min(limit, settings.max_input_tokens)
        cost = CostModel.from_manifest(
            manifest,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_memory_bytes=settings.max_batch_memory_bytes,
        )
        fitting = cost.max_single_input(limit)
        if fitting < limit:
            # Refuse (or truncate, per request) what would not fit in memory rather than be
            # OOM-killed mid-batch with everyone else's work.
            log.warning(
                "inputs are capped at %d tokens: one input of %d would need %.1f GiB of activations "
                "(max_batch_memory_bytes=%d); raise the budget or export the chunked graph",
                fitting,
                limit,
                cost.memory_bytes(1, limit) / 2**30,
                settings.max_batch_memory_bytes,
            )
            limit = fitting
        self.max_input_tokens = limit
        self._cost = cost
        tokenizer = TextTokenizer.from_bundle(
            directory, manifest, max_input_tokens=limit, default_truncation=settings.default_truncation
        )
        runtime = self._runtime_factory(settings, manifest, directory, limit)
        warm_up(
            runtime, manifest.tokenizer.pad_id, max_batch_size=settings.max_batch_size, max_input_tokens=limit
        )
        if settings.self_test:
            self._self_test = self_test(manifest, tokenizer, runtime, cosine_threshold(manifest, settings))
        else:
            self._self_test = SelfTestResult(ran=False, passed=False, message="disabled by the operator")
        self._manifest, self._tokenizer, self._runtime = manifest, tokenizer, runtime

    async def drain(self) -> None:
        """Refuse new work (UNAVAILABLE) and wait for accepted work; callers bound the wait."""
        if self._state == "ready":
            self._set_state("draining")
        if self._batcher is not None:
            await self._batcher.drain()
        await self._quiet.wait()

    async def close(self) -> None:
        if self._state not in ("failed", "stopped"):
            self._set_state("stopped")
        if self._batcher is not None:
            await self._batcher.close()
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # --- requests ------------------------------------------------------------------------------
    def _admit(self) -> tuple[Manifest, TextTokenizer, Batcher]:
        if self._state == "starting":
            raise NotReady("the model is warming up; retry shortly")
        if self._state in ("draining", "stopped"):
            raise Draining("the server is shutting down; retry on another replica")
        if (
            self._state == "failed"
            or self._manifest is None
            or self._tokenizer is None
            or self._batcher is None
        ):
            raise NotReady("the model failed to load")
        return self._manifest, self._tokenizer, self._batcher

    def _begin(self) -> None:
        self._active += 1
        self._quiet.clear()

    def _end(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._quiet.set()

    def _check_count(
        self, count: int, texts: tuple[str, ...], token_ids: tuple[tuple[int, ...], ...]
    ) -> None:
        if texts and token_ids:
            raise InvalidInput("give either texts or token ids, not both", field="inputs")
        if count == 0:
            raise InvalidInput("inputs is empty: give at least one input", field="inputs")
        if count > self.settings.max_inputs_per_request:
            raise TooManyInputs(
                f"{count} inputs is more than the limit of {self.settings.max_inputs_per_request} "
                "per request",
                field="inputs",
            )
        for index, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"input {index} is an empty string", field=f"inputs[{index}]")
        for index, ids in enumerate(token_ids):
            if not ids:
                raise InvalidInput(f"token input {index} is empty", field=f"token_inputs[{index}]")

    async def _tokenize(self, job: EmbedJob | TokenizeJob, tokenizer: TextTokenizer) -> list[Tokenized]:
        loop = asyncio.get_running_loop()
        if isinstance(job, EmbedJob) and job.token_ids:
            if job.task or job.instruction:
                raise InvalidInput("instructions apply to text inputs only, not token ids", field="task")
            call = partial(tokenizer.encode_ids, job.token_ids, truncation=job.truncation)
        else:
            call = partial(
                tokenizer.encode_texts,
                job.texts,
                input_type=job.input_type,
                task=job.task,
                instruction=job.instruction,
                truncation=job.truncation,
            )
        return await loop.run_in_executor(self._tok_pool, call)

    async def embed(self, job: EmbedJob) -> EmbedResult:
        """Validate, tokenise (thread), batch, run (worker thread), post-process.

        Raises :mod:`service.errors` classes only, each carrying the request id; anything else
        is logged with its traceback and becomes a :class:`RuntimeFailure`.
        """
        request_id = job.request_id or new_request_id()
        try:
            return await self._embed(job, request_id)
        except EmbeddingError as exc:
            exc.request_id = exc.request_id or request_id
            raise
        except Exception as exc:
            log.error("embed failed (request_id=%s)", request_id, exc_info=exc)
            raise RuntimeFailure(f"unexpected error: {exc!r}", request_id=request_id) from exc

    async def _embed(self, job: EmbedJob, request_id: str) -> EmbedResult:
        started = time.perf_counter()
        manifest, tokenizer, batcher = self._admit()
        self._check_count(job.count, job.texts, job.token_ids)
        check_dimensions(job.dimensions, model_dims=manifest.dim, allowed=self.settings.allow_dimensions)
        if job.deadline is not None and time.monotonic() >= job.deadline:
            raise DeadlineExceeded("the deadline passed before the request started")
        self._begin()
        try:
            tokenized = await self._tokenize(job, tokenizer)
            tokenize_ms = (time.perf_counter() - started) * 1000.0
            out = await batcher.submit([t.ids for t in tokenized], job.deadline, request_id=request_id)
        finally:
            self._end()
        vectors = postprocess(out.vectors, out.norms, normalize=job.normalize, dimensions=job.dimensions)
        usage = Usage(
            input_tokens=sum(t.token_count for t in tokenized),
            truncated_inputs=sum(1 for t in tokenized if t.truncated),
        )
        timings = Timings(
            queue_ms=out.queue_ms,
            tokenize_ms=tokenize_ms,
            inference_ms=out.inference_ms,
            total_ms=(time.perf_counter() - started) * 1000.0,
        )
        result = EmbedResult(vectors, tuple(tokenized), usage, timings, self.model_name, request_id)
        for listener in self._result_listeners:
            listener(result)
        return result

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult:
        """Exactly the ids ``embed`` would send to the model for the same texts and options."""
        _, tokenizer, _ = self._admit()
        self._check_count(len(job.texts), job.texts, ())
        tokenized = await self._tokenize(job, tokenizer)
        tokens = tuple(tokenizer.tokens(t.ids) for t in tokenized) if job.return_tokens else ()
        return TokenizeResult(tuple(tokenized), tokens, self.model_name, job.request_id or new_request_id())

    # --- information -----------------------------------------------------------------------------
    @property
    def dimensions(self) -> int:
        """The model's native vector size (cheap; for per-request checks)."""
        if self._manifest is None:
            raise NotReady("the model is warming up; retry shortly")
        return self._manifest.dim

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        return self._manifest.model_id if self._manifest is not None else ""

    @property
    def self_test_result(self) -> SelfTestResult:
        return self._self_test

    def model_info(self) -> ModelInfo:
        manifest = self._manifest
        if manifest is None or self._runtime is None:
            raise NotReady("the model is warming up; retry shortly")
        s = self.settings
        return ModelInfo(
            model=self.model_name,
            model_id=manifest.model_id,
            source_kind=manifest.source.kind,
            source_id=manifest.source.id,
            source_revision=manifest.source.revision,
            family=manifest.family,
            model_type=manifest.model_type,
            dimensions=manifest.dim,
            max_input_tokens=self.max_input_tokens,
            pooling=manifest.pooling,
            attention=manifest.attention,
            precision=manifest.precision,
            execution_providers=self._runtime.providers,
            bundle_sha256=self._bundle_sha256,
            tasks=dict(manifest.prompts.tasks),
            default_task=manifest.prompts.default_task,
            query_template=manifest.prompts.query_template,
            limits=Limits(
                max_inputs_per_request=s.max_inputs_per_request,
                max_input_tokens=self.max_input_tokens,
                max_batch_tokens=s.max_batch_tokens,
                max_batch_size=s.max_batch_size,
                max_queue_tokens=s.max_queue_tokens,
                max_message_bytes=s.max_message_bytes,
                default_truncation=s.default_truncation,
                allow_dimensions=s.allow_dimensions,
            ),
            validation=dict(manifest.validation),
            self_test=self._self_test,
            batch_invariant=manifest.batch_invariant,
            matryoshka=manifest.matryoshka,
        )
