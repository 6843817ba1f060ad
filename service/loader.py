"""Start-up wiring: from ``Settings`` to one frozen :class:`LoadedModel`, or a ``StartupError``.

Why its own module: loading is a one-shot pipeline (verify the bundle, size the limits, build the
tokenizer and the runtime, warm up, self-test) whose result never changes afterwards, while the
core is a long-lived state machine. Keeping them apart lets the core hold one immutable object
instead of half a dozen attributes that are ``None`` until start-up finished.

Every failure names the file or setting and what to do: each stage runs inside :func:`stage`,
which turns whatever a library raised (``Exception('key must be a string…')`` from a garbage
``tokenizer.json``, ``[Errno 17] File exists`` from a cache path) into a ``StartupError`` that
says what was being loaded. ``BundleError``/``StartupError`` already say so and pass unchanged.

Runs in a worker thread (``EmbeddingCore.start`` uses ``asyncio.to_thread``); no asyncio here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bundle.manifest import MANIFEST_NAME, BundleError, Manifest, file_sha256, load_manifest, verify_files
from service.claims import check_graph_file, check_tokenizer, probe
from service.cost import CostModel
from service.domain import SelfTestResult
from service.errors import StartupError
from service.runtime import OrtRuntime, Runtime
from service.selftest import cosine_threshold, self_test, warm_up
from service.settings import Settings
from service.tokenizer import TextTokenizer

log = logging.getLogger("service.loader")

RuntimeFactory = Callable[[Settings, Manifest, Path, int], Runtime]


def ort_runtime(settings: Settings, manifest: Manifest, directory: Path, max_input_tokens: int) -> Runtime:
    return OrtRuntime(settings, manifest, directory, max_input_tokens=max_input_tokens)


@dataclass(frozen=True)
class LoadedModel:
    """Everything start-up produced; read-only for the life of the process."""

    manifest: Manifest
    tokenizer: TextTokenizer
    runtime: Runtime
    cost: CostModel
    max_input_tokens: int
    bundle_sha256: str
    self_test: SelfTestResult


def describe_exception(exc: BaseException) -> str:
    """A library exception in words an operator can act on (OSError: reason and path)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip() or "no message"
    return f"{type(exc).__name__}: {text[:500]}"


@contextmanager
def stage(what: str, fix: str) -> Iterator[None]:
    """Run one start-up step; any failure becomes ``StartupError('<what>: <why>; <fix>')``."""
    try:
        yield
    except (StartupError, BundleError):
        raise
    except Exception as exc:
        raise StartupError(f"{what}: {describe_exception(exc)}; {fix}") from exc


def input_limit(settings: Settings, manifest: Manifest, cost: CostModel) -> int:
    """The served per-input token limit: the manifest's, lowered by the setting and by memory."""
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
    return limit


def load_model(settings: Settings, runtime_factory: RuntimeFactory = ort_runtime) -> LoadedModel:
    """Verify and load the bundle, warm up and self-test. Raises ``BundleError``/``StartupError``."""
    directory = settings.bundle_dir
    bundle_fix = "check --model-dir (EMBED_MODEL_DIR) and that the bundle is complete and readable"
    with stage(f"reading the bundle in {directory}", bundle_fix):
        manifest = load_manifest(directory)
        verify_files(directory, manifest)
        bundle_sha256 = file_sha256(directory / MANIFEST_NAME)
    with stage(
        "sizing the limits from manifest.json and the settings",
        "check max_input_tokens, max_batch_tokens and max_batch_memory_bytes",
    ):
        cost = CostModel.from_manifest(
            manifest,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_memory_bytes=settings.max_batch_memory_bytes,
        )
        limit = input_limit(settings, manifest, cost)
    special = len(manifest.tokenizer.prefix_ids) + len(manifest.tokenizer.suffix_ids)
    if limit <= special:
        raise StartupError(
            f"max_input_tokens={limit} leaves no room for text after the model's {special} special "
            "tokens; raise --max-input-tokens (EMBED_MAX_INPUT_TOKENS) or max_batch_memory_bytes"
        )
    tokenizer_path = directory / manifest.tokenizer.file
    with stage(
        f"loading the tokenizer {tokenizer_path}",
        "it is not a valid Hugging Face tokenizers file (tokenizer.json); re-export the bundle or "
        "restore the original file",
    ):
        tokenizer = TextTokenizer.from_bundle(
            directory, manifest, max_input_tokens=limit, default_truncation=settings.default_truncation
        )
    check_tokenizer(manifest, tokenizer)
    graph = directory / manifest.graph.file
    with stage(
        f"creating the runtime for {graph} (provider={settings.provider})",
        "check the provider settings (--provider, --device-id, --trt-cache-dir) and the graph file",
    ):
        runtime = runtime_factory(settings, manifest, directory, limit)
    probe(manifest, runtime, limit, vocab_checked=check_graph_file(manifest, directory))
    with stage(
        f"warm-up run of {graph}",
        "lower --max-batch-size or --max-input-tokens, or check the device's free memory",
    ):
        warm_up(
            runtime, manifest.tokenizer.pad_id, max_batch_size=settings.max_batch_size, max_input_tokens=limit
        )
    with stage(
        f"self-test of {graph} against the golden vectors in {directory / MANIFEST_NAME}",
        "re-export the bundle, or start with --no-self-test to investigate",
    ):
        if settings.self_test:
            result = self_test(manifest, tokenizer, runtime, cosine_threshold(manifest, settings))
        else:
            result = SelfTestResult(ran=False, passed=False, message="disabled by the operator")
    return LoadedModel(manifest, tokenizer, runtime, cost, limit, bundle_sha256, result)
