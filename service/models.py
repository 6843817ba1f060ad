"""``ModelRegistry``: several bundles in one server, one :class:`EmbeddingCore` each.

Why one core per model: a core owns one runtime session, one batcher and one watchdog, and its
token budgets and memory bounds are already per batcher, so serving N models is N cores plus a
name lookup. The front ends hold the registry and call it as they called the core; the job's
``model`` field (empty: the default, i.e. first ``--model-dir``) picks the core. A name that is
neither a served model, a manifest model id nor an ``--model-alias`` is ``ModelNotFound``
(NOT_FOUND / 404) listing what is served: an alias is the only way a client's hard-coded name
(``text-embedding-3-small``) reaches a model, so it never happens by accident.

State: the registry is ``ready`` when every model is; ``failed`` / ``stalled`` / ``draining`` /
``starting`` when any model is (in that order of precedence). Each core still reports its own
state, which the gRPC health service publishes under a per-model name (server.py).

Start-up: the predicted memory of all models (bundle files + one largest batch each) must fit
``max_total_memory_bytes`` when it is set, else start-up is refused naming each model's share;
with the limit set the models then load in parallel, without it one after another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from bundle.manifest import BundleError, load_manifest
from service.core import EmbeddingCore, ResultListener, StallObserver, StateListener
from service.cost import CostModel
from service.domain import CoreState, EmbedJob, EmbedResult, ModelInfo, TokenizeJob, TokenizeResult
from service.errors import ModelNotFound, NotReady, StartupError
from service.loader import RuntimeFactory, ort_runtime
from service.settings import ModelSpec, Settings

log = logging.getLogger("service.models")

# Client-sent names are echoed in errors and logs: bounded, like task names.
MODEL_NAME_MAX_CHARS = 256
# Precedence of a model's state in the registry's: the first one any model is in wins.
_PRECEDENCE: tuple[CoreState, ...] = ("failed", "stopped", "draining", "stalled", "starting")
BatchHook = Callable[[str], Callable[[int, int, int], None] | None]
StallHook = Callable[[str], StallObserver | None]


def model_settings(settings: Settings, spec: ModelSpec) -> Settings:
    """The settings one core sees: the shared limits, its own bundle directory and name."""
    return settings.model_copy(update={"model_dir": (str(spec.directory),), "model_name": spec.name})


def predicted_memory_bytes(settings: Settings) -> int:
    """Bundle files on disk (weights) plus the activations of the largest batch the batcher forms."""
    directory = settings.bundle_dir
    manifest = load_manifest(directory)
    weights = sum((directory / rel).stat().st_size for rel in manifest.files)
    cost = CostModel.from_manifest(
        manifest,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_memory_bytes=settings.max_batch_memory_bytes,
    )
    longest = min(manifest.max_input_tokens, settings.max_input_tokens or manifest.max_input_tokens)
    batch = max(1, min(settings.max_batch_size, settings.max_batch_tokens // max(longest, 1)))
    return weights + min(settings.max_batch_memory_bytes, cost.memory_bytes(batch, longest))


def combined_state(states: Iterable[CoreState]) -> CoreState:
    seen = set(states)
    for state in _PRECEDENCE:
        if state in seen:
            return state
    return "ready"


class ModelRegistry:
    """The served models by name; the default first. Same calls as one ``EmbeddingCore``."""

    def __init__(self, settings: Settings, cores: list[EmbeddingCore]) -> None:
        if not cores:
            raise ValueError("a registry serves at least one model")
        self.settings = settings
        self.cores = cores
        self._aliases = settings.aliases()
        self._refused = False
        self._state: CoreState = "starting"
        self._listeners: list[StateListener] = []
        for core in cores:
            core.add_state_listener(self._core_changed)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        runtime_factory: RuntimeFactory = ort_runtime,
        on_batch: BatchHook | None = None,
        on_stall: StallHook | None = None,
    ) -> ModelRegistry:
        """One core per ``--model-dir``; the hooks get the model's directory-or-name label."""
        cores = []
        for spec in settings.models():
            label = spec.name or spec.directory.name
            cores.append(
                EmbeddingCore(
                    model_settings(settings, spec),
                    runtime_factory=runtime_factory,
                    on_batch=on_batch(label) if on_batch else None,
                    on_stall=on_stall(label) if on_stall else None,
                )
            )
        return cls(settings, cores)

    @classmethod
    def of(cls, settings: Settings, core: EmbeddingCore | ModelRegistry) -> ModelRegistry:
        """A single core (tests, embedders) is served as a one-model registry."""
        return core if isinstance(core, ModelRegistry) else cls(settings, [core])

    # --- state ---------------------------------------------------------------------------------
    @property
    def default(self) -> EmbeddingCore:
        return self.cores[0]

    @property
    def state(self) -> CoreState:
        return self._state

    @property
    def serving(self) -> bool:
        return self._state == "ready"

    @property
    def model_name(self) -> str:
        return ", ".join(core.model_name or str(core.settings.bundle_dir) for core in self.cores)

    def add_state_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)
        listener(self._state)

    def add_result_listener(self, listener: ResultListener) -> None:
        for core in self.cores:
            core.add_result_listener(listener)

    def _core_changed(self, _: CoreState) -> None:
        state: CoreState = "failed" if self._refused else combined_state(c.state for c in self.cores)
        if state != self._state:
            self._state = state
            for listener in self._listeners:
                listener(state)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Check memory, load every model (in parallel when a memory limit is set), check names."""
        limit = self.settings.max_total_memory_bytes
        if limit is not None:
            await self._check_memory(limit)
        if limit is not None and len(self.cores) > 1:
            outcomes = await asyncio.gather(*(c.start() for c in self.cores), return_exceptions=True)
            for core, outcome in zip(self.cores, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    raise self._failed(core, outcome)
        else:
            for core in self.cores:
                try:
                    await core.start()
                except StartupError as exc:
                    raise self._failed(core, exc) from exc
        self._check_names()
        for core in self.cores:
            log.info("model %s (%s): %s", core.model_name, core.settings.bundle_dir, core.state)

    def _failed(self, core: EmbeddingCore, exc: BaseException) -> StartupError:
        if len(self.cores) == 1:
            return exc if isinstance(exc, StartupError) else StartupError(str(exc))
        return StartupError(f"model {core.model_name or core.settings.bundle_dir}: {exc}")

    def _refuse(self, message: str) -> StartupError:
        self._refused = True
        self._core_changed("failed")
        return StartupError(message)

    async def _check_memory(self, limit: int) -> None:
        shares = []
        for core in self.cores:
            try:
                share = await asyncio.to_thread(predicted_memory_bytes, core.settings)
            except (BundleError, OSError) as exc:
                raise self._refuse(f"reading the bundle in {core.settings.bundle_dir}: {exc}") from exc
            shares.append((core.settings.model_name or str(core.settings.bundle_dir), share))
        total = sum(share for _, share in shares)
        log.info("predicted memory: %s", ", ".join(f"{name} {share} bytes" for name, share in shares))
        if total > limit:
            listed = ", ".join(f"{name} {share / 2**30:.2f} GiB" for name, share in shares)
            raise self._refuse(
                f"the models need {total / 2**30:.2f} GiB together ({listed}), more than "
                f"max_total_memory_bytes={limit} ({limit / 2**30:.2f} GiB); serve fewer models, "
                "lower max_batch_memory_bytes or raise the limit"
            )

    def _check_names(self) -> None:
        seen: dict[str, EmbeddingCore] = {}
        for core in self.cores:
            other = seen.get(core.model_name)
            if other is not None:
                raise self._refuse(
                    f"{other.settings.bundle_dir} and {core.settings.bundle_dir} are both named "
                    f"{core.model_name!r}; name them with --model-dir NAME=PATH"
                )
            seen[core.model_name] = core
        for alias, target in self._aliases.items():
            if alias in seen:
                raise self._refuse(f"model_alias {alias}={target}: {alias} is a served model's name")
            if target not in seen:
                raise self._refuse(
                    f"model_alias {alias}={target}: no served model is named {target!r} "
                    f"(served: {', '.join(seen)})"
                )

    async def drain(self) -> None:
        await asyncio.gather(*(core.drain() for core in self.cores))

    async def close(self) -> None:
        for core in self.cores:
            await core.close()

    # --- requests ------------------------------------------------------------------------------
    def served(self) -> str:
        names = ", ".join(core.model_name for core in self.cores if core.model_name)
        aliases = ", ".join(f"{a} -> {m}" for a, m in sorted(self._aliases.items()))
        return f"served: {names}" + (f"; aliases: {aliases}" if aliases else "")

    def get(self, name: str | None) -> EmbeddingCore:
        """The core serving ``name`` (a name, alias or manifest model id); the default for None/""."""
        if not name:
            return self.default
        if len(name) > MODEL_NAME_MAX_CHARS:
            raise ModelNotFound(
                f"model names are at most {MODEL_NAME_MAX_CHARS} characters (got {len(name)}); "
                + self.served(),
                field="model",
            )
        wanted = self._aliases.get(name, name)
        for core in self.cores:
            if core.model_name == wanted:
                return core
        for core in self.cores:  # the manifest's id, as a single-model server always accepted
            if core.model_id == wanted:
                return core
        if any(not core.model_name for core in self.cores):
            raise NotReady("the models are still loading; retry shortly")
        raise ModelNotFound(f"model {name!r} is not served here; {self.served()}", field="model")

    async def embed(self, job: EmbedJob) -> EmbedResult:
        return await self.get(job.model).embed(job)

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult:
        return await self.get(job.model).tokenize(job)

    def model_info(self, model: str | None = None) -> ModelInfo:
        return self.get(model).model_info()

    def model_infos(self) -> list[ModelInfo]:
        """Every loaded model's information, the default first."""
        out = []
        for core in self.cores:
            try:
                out.append(core.model_info())
            except NotReady:  # still loading, or failed: not listed
                continue
        return out

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)
