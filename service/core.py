"""``EmbeddingCore``: the transport-neutral service. Both front ends are thin adapters over it.

Why one core: validation, the instruction/truncation policy, batching, post-processing and
readiness must behave identically for gRPC and the OpenAI-compatible HTTP API. Adapters turn
their wire format into :class:`~service.domain.EmbedJob` and results back; errors are raised as
:mod:`service.errors` classes and mapped by each front end from the one table.

Lifecycle: ``starting`` (bundle verified, session created, warm-up, self-test — in a thread, so
health checks keep answering NOT_SERVING) → ``ready`` → ``draining`` (new work refused, accepted
work finishes) → ``stopped``; ``failed`` when start-up failed; ``ready`` ⇄ ``stalled`` when the
watchdog (:mod:`service.watchdog`) sees the runtime stop making progress (health NOT_SERVING,
new work refused with UNAVAILABLE). Listeners (health services, metrics) are told of every change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from bundle.manifest import BundleError
from service.batcher import Batcher, BatchObserver
from service.cache import CacheStats, VectorCache, submit_cached
from service.domain import (
    CoreState,
    EmbedJob,
    EmbedResult,
    Limits,
    ModelInfo,
    SelfTestResult,
    Timings,
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
    StartupError,
    TooManyInputs,
)
from service.loader import LoadedModel, RuntimeFactory, describe_exception, load_model, ort_runtime
from service.logs import new_request_id
from service.quotas import charge_tokens
from service.settings import Settings
from service.tokenize_lanes import TokenizeLanes
from service.trace_hooks import record_embed
from service.watchdog import Stall, Watchdog

log = logging.getLogger("service.core")

StateListener = Callable[[CoreState], None]
# The watchdog's verdict changed: a Stall (kind, reason), or None when the runtime recovered.
StallObserver = Callable[[Stall | None], None]
ResultListener = Callable[[EmbedResult], None]


__all__ = ["EmbeddingCore", "RuntimeFactory", "StateListener", "ort_runtime"]


class EmbeddingCore:
    """Loads a bundle and serves embed / tokenize / model_info; owns the batcher."""

    def __init__(
        self,
        settings: Settings,
        *,
        runtime_factory: RuntimeFactory = ort_runtime,
        on_batch: BatchObserver | None = None,
        on_stall: StallObserver | None = None,
    ) -> None:
        self.settings = settings
        self._runtime_factory = runtime_factory
        self._on_batch = on_batch
        self._on_stall = on_stall
        self._watchdog: Watchdog | None = None
        self._state: CoreState = "starting"
        self._listeners: list[StateListener] = []
        self._result_listeners: list[ResultListener] = []
        self._active = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._lanes = TokenizeLanes()  # a one-word request never waits behind megabytes of text
        self._model: LoadedModel | None = None
        self._batcher: Batcher | None = None
        self._cache = VectorCache(settings.cache_bytes)

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
        log.info("core state: %s (model %s, %s)", state, self.model_name or "-", self.settings.bundle_dir)
        for listener in self._listeners:
            listener(state)

    async def start(self) -> None:
        """Verify and load the bundle, warm up, self-test, then serve. Raises StartupError."""
        try:
            model = await asyncio.to_thread(load_model, self.settings, self._runtime_factory)
        except (BundleError, StartupError) as exc:  # these name their file or setting already
            self._set_state("failed")
            raise StartupError(str(exc)) from exc
        except Exception as exc:  # a step outside every stage (a bug): still say where to look
            self._set_state("failed")
            log.error("start-up failed outside a named stage", exc_info=exc)
            raise StartupError(
                f"start-up failed loading {self.settings.bundle_dir}: {describe_exception(exc)}; "
                "the traceback is in the log"
            ) from exc
        self._model = model
        self._batcher = Batcher(
            model.runtime,
            max_batch_tokens=self.settings.max_batch_tokens,
            cost=model.cost,
            max_padding_ratio=self.settings.max_padding_ratio,
            max_batch_size=self.settings.max_batch_size,
            max_batch_wait_ms=self.settings.max_batch_wait_ms,
            max_queue_tokens=self.settings.max_queue_tokens,
            pad_id=model.manifest.tokenizer.pad_id,
            batch_invariant=model.manifest.batch_invariant,
            on_batch=self._on_batch,
        )
        self._batcher.start()
        self._watchdog = Watchdog(
            self._batcher.progress,
            self._stall_changed,
            floor_s=self.settings.watchdog_stall_s,
            factor=self.settings.watchdog_factor,
        )
        self._watchdog.start()
        self._set_state("ready")

    def _stall_changed(self, stall: Stall | None) -> None:
        if self._on_stall is not None:
            self._on_stall(stall)
        if stall is not None:
            log.error("health NOT_SERVING (watchdog, %s): %s", stall.kind, stall.reason)
            if self._state == "ready":
                self._set_state("stalled")
        else:
            log.warning("the runtime is making progress again; health SERVING")
            if self._state == "stalled":
                self._set_state("ready")

    async def drain(self) -> None:
        """Refuse new work (UNAVAILABLE) and wait for accepted work; callers bound the wait."""
        if self._state in ("ready", "stalled"):
            self._set_state("draining")
        if self._batcher is not None:
            await self._batcher.drain()
        await self._quiet.wait()

    async def close(self) -> None:
        if self._state not in ("failed", "stopped"):
            self._set_state("stopped")
        if self._watchdog is not None:
            await self._watchdog.stop()
        if self._batcher is not None:
            await self._batcher.close()
        self._lanes.shutdown()

    # --- requests ------------------------------------------------------------------------------
    def _admit(self) -> tuple[LoadedModel, Batcher]:
        if self._state == "starting":
            raise NotReady("the model is warming up; retry shortly")
        if self._state in ("draining", "stopped"):
            raise Draining("the server is shutting down; retry on another replica")
        if self._state == "stalled":
            raise NotReady("the runtime is not making progress (watchdog); retry on another replica")
        if self._state == "failed" or self._model is None or self._batcher is None:
            raise NotReady("the model failed to load")
        return self._model, self._batcher

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
        model, batcher = self._admit()
        tokenizer = model.tokenizer
        self._check_count(job.count, job.texts, job.token_ids)
        check_dimensions(
            job.dimensions, model_dims=model.manifest.dim, allowed=self.settings.allow_dimensions
        )
        if job.deadline is not None and time.monotonic() >= job.deadline:
            raise DeadlineExceeded("the deadline passed before the request started")
        self._begin()
        try:
            tokenized = await self._lanes.run(job, tokenizer)
            tokenize_ms = (time.perf_counter() - started) * 1000.0
            charge_tokens(sum(t.token_count for t in tokenized))  # per-key tokens/minute, before batching
            out = await submit_cached(
                self._cache,
                model.bundle_sha256,
                batcher,
                [t.ids for t in tokenized],
                job.deadline,
                request_id=request_id,
            )
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
        record_embed(request_id, timings, out.batches, started)  # a no-op unless this request is traced
        for listener in self._result_listeners:
            listener(result)
        return result

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult:
        """Exactly the ids ``embed`` would send to the model for the same texts and options."""
        model, _ = self._admit()
        tokenizer = model.tokenizer
        self._check_count(len(job.texts), job.texts, ())
        tokenized = await self._lanes.run(job, tokenizer)
        tokens = tuple(tokenizer.tokens(t.ids) for t in tokenized) if job.return_tokens else ()
        return TokenizeResult(tuple(tokenized), tokens, self.model_name, job.request_id or new_request_id())

    # --- information -----------------------------------------------------------------------------
    @property
    def dimensions(self) -> int:
        """The model's native vector size (cheap; for per-request checks)."""
        if self._model is None:
            raise NotReady("the model is warming up; retry shortly")
        return self._model.manifest.dim

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        return self._model.manifest.model_id if self._model is not None else ""

    @property
    def model_id(self) -> str:
        """The manifest's model id ("" until loaded); clients may send it instead of the name."""
        return self._model.manifest.model_id if self._model is not None else ""

    @property
    def max_input_tokens(self) -> int:
        """The served per-input limit (0 until loaded)."""
        return self._model.max_input_tokens if self._model is not None else 0

    def cache_stats(self) -> CacheStats:
        """The result cache's counters and size (service/cache.py), for metrics at scrape time."""
        return self._cache.stats()

    @property
    def self_test_result(self) -> SelfTestResult:
        if self._model is None:
            return SelfTestResult(ran=False, passed=False, message="not run yet")
        return self._model.self_test

    def model_info(self) -> ModelInfo:
        model = self._model
        if model is None:
            raise NotReady("the model is warming up; retry shortly")
        manifest, s = model.manifest, self.settings
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
            execution_providers=model.runtime.providers,
            bundle_sha256=model.bundle_sha256,
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
            self_test=model.self_test,
            batch_invariant=manifest.batch_invariant,
            matryoshka=manifest.matryoshka,
        )
