"""The inference seam: a ``Runtime`` protocol and ``OrtRuntime`` over ONNX Runtime.

Why a protocol: the batcher and the servers are tested with fake runtimes (failing, slow,
call-counting) and never import onnxruntime. ``OrtRuntime`` is the only module that does.

ONNX Runtime falls back to CPU *silently* when the wanted provider cannot load (no CUDA, wrong
cuDNN). After creating the session we compare ``session.get_providers()`` with what was asked and
fail start-up (or warn, per ``provider_fallback``), so a GPU deployment never quietly runs on CPU.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from bundle.manifest import Manifest
from service.domain import FloatArray
from service.errors import StartupError
from service.settings import Settings

log = logging.getLogger("service.runtime")

IntArray = npt.NDArray[np.int64]
ProviderChain = list[tuple[str, dict[str, str]]]

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_SUPPORTED_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}


class Runtime(Protocol):
    """Runs one padded batch. Called from a single worker thread, never from the event loop."""

    @property
    def providers(self) -> tuple[str, ...]:
        """Execution providers actually in use, in priority order."""
        ...

    def run(self, input_ids: IntArray, attention_mask: IntArray) -> tuple[FloatArray, FloatArray]:
        """``[batch, seq]`` int64 → (L2-normalised ``[batch, dim]`` float32, norms ``[batch]``)."""
        ...


def length_buckets(max_tokens: int, smallest: int = 64) -> list[int]:
    """Sequence-length bucket upper bounds: doubling from ``smallest``, ending at ``max_tokens``.

    TensorRT builds one optimisation profile per bucket, so a batch of short texts runs on an
    engine tuned for short shapes rather than the 32k worst case.
    """
    buckets, edge = [], smallest
    while edge < max_tokens:
        buckets.append(edge)
        edge *= 2
    return [*buckets, max_tokens]


def trt_profiles(
    inputs: Sequence[str], buckets: Sequence[int], max_batch_size: int, max_batch_tokens: int
) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes``: one profile per length bucket (names repeat per profile).

    A batch whose longest input falls in (lo, hi] holds at most max_batch_tokens // (lo + 1) inputs
    (the batcher's padded cost), but one oversize input always runs alone, hence the ``max(1, …)``.
    """
    mins, opts, maxs = [], [], []
    lo = 0
    for hi in buckets:
        batch_max = max(1, min(max_batch_size, max_batch_tokens // (lo + 1)))
        batch_opt = max(1, min(batch_max, max_batch_tokens // hi))
        for name in inputs:
            mins.append(f"{name}:1x{lo + 1}")
            opts.append(f"{name}:{batch_opt}x{hi}")
            maxs.append(f"{name}:{batch_max}x{hi}")
        lo = hi
    return {
        "trt_profile_min_shapes": ",".join(mins),
        "trt_profile_opt_shapes": ",".join(opts),
        "trt_profile_max_shapes": ",".join(maxs),
    }


def provider_chain(settings: Settings, inputs: Sequence[str], max_input_tokens: int) -> ProviderChain:
    """The ``providers=`` list for ``InferenceSession``: wanted provider first, then fallbacks."""
    cpu: ProviderChain = [("CPUExecutionProvider", {})]
    if settings.provider == "cpu":
        return cpu
    cuda_opts = {"device_id": str(settings.device_id), "arena_extend_strategy": "kSameAsRequested"}
    if settings.cuda_mem_limit_bytes is not None:
        cuda_opts["gpu_mem_limit"] = str(settings.cuda_mem_limit_bytes)
    cuda: ProviderChain = [("CUDAExecutionProvider", cuda_opts)]
    if settings.provider == "cuda":
        return cuda + cpu
    cache = str(settings.trt_cache_dir)
    trt = {
        "device_id": str(settings.device_id),
        "trt_fp16_enable": str(settings.trt_fp16),
        "trt_bf16_enable": str(settings.trt_bf16),
        "trt_int8_enable": str(settings.trt_int8),
        "trt_layer_norm_fp32_fallback": str(settings.trt_layer_norm_fp32_fallback),
        "trt_max_workspace_size": str(settings.trt_max_workspace_bytes),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        **trt_profiles(
            inputs, length_buckets(max_input_tokens), settings.max_batch_size, settings.max_batch_tokens
        ),
    }
    return [("TensorrtExecutionProvider", trt), *cuda, *cpu]


def check_providers(wanted: str, in_use: Sequence[str], available: Sequence[str], policy: str) -> None:
    """Fail (or warn) when ONNX Runtime did not give us the provider we asked for."""
    name = PROVIDER_NAMES[wanted]
    if name in in_use:
        return
    message = (
        f"execution provider {name} was requested but ONNX Runtime is using {list(in_use)} "
        f"(available in this build: {list(available)}); is onnxruntime-gpu installed and the GPU visible?"
    )
    if policy == "fail":
        raise StartupError(message + " Set provider_fallback=warn to run anyway.")
    log.warning("%s Continuing because provider_fallback=warn.", message)


def _prepare_cache_dir(path: Path) -> None:
    """Create the TensorRT engine cache directory, or say which setting is wrong and why."""
    setting = "trt_cache_dir (--trt-cache-dir / EMBED_TRT_CACHE_DIR)"
    if path.exists() and not path.is_dir():
        raise StartupError(f"{setting} {path} is a file, not a directory; point it at a writable directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"{setting} {path} cannot be created: {exc.strerror or exc} ({exc.filename or path}); "
            "point it at a writable directory"
        ) from exc


class OrtRuntime:
    """One ``InferenceSession`` for the bundle's graph, loaded by path (external data beside it)."""

    def __init__(
        self, settings: Settings, manifest: Manifest, directory: Path, *, max_input_tokens: int
    ) -> None:
        import onnxruntime as ort  # heavy import kept out of module import time

        unknown = set(manifest.graph.inputs) - _SUPPORTED_INPUTS
        if unknown:
            raise StartupError(f"graph input(s) {sorted(unknown)} are not supported by this server")
        self._inputs = list(manifest.graph.inputs)
        self._outputs = list(manifest.graph.outputs[:2])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.log_severity_level = 3  # ORT's own fallback chatter; we check providers ourselves
        # No spin-waiting after a run: the pool's threads would burn the cores the event loop, the
        # tokeniser and the next request need (measured: a third of the server's CPU at 1 client).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if settings.provider == "tensorrt":
            _prepare_cache_dir(settings.trt_cache_dir)
        chain = provider_chain(settings, self._inputs, max_input_tokens)
        try:
            with warnings.catch_warnings():
                # ORT warns (and falls back) when a provider is not in this build; checked below.
                warnings.simplefilter("ignore", UserWarning)
                self._session = ort.InferenceSession(
                    str(directory / manifest.graph.file),
                    sess_options=options,
                    providers=[name for name, _ in chain],
                    provider_options=[opts for _, opts in chain],
                )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            raise StartupError(
                f"could not create the ONNX Runtime session for {manifest.graph.file}: {exc}"
            ) from exc
        self._providers = tuple(self._session.get_providers())
        check_providers(
            settings.provider, self._providers, ort.get_available_providers(), settings.provider_fallback
        )
        on_device = settings.provider in ("cuda", "tensorrt") and "CUDAExecutionProvider" in self._providers
        self._bind_device: str | None = "cuda" if on_device and settings.cuda_io_binding else None
        self._device_id = settings.device_id
        log.info("ONNX Runtime session ready: providers=%s", list(self._providers))

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    def _feeds(self, input_ids: IntArray, attention_mask: IntArray) -> dict[str, IntArray]:
        known = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids),
        }
        return {name: known[name] for name in self._inputs}

    def run(self, input_ids: IntArray, attention_mask: IntArray) -> tuple[FloatArray, FloatArray]:
        feeds = self._feeds(input_ids, attention_mask)
        if self._bind_device is None:
            vectors, norms = self._session.run(self._outputs, feeds)
        else:
            vectors, norms = self._run_bound(feeds, self._bind_device)
        return np.asarray(vectors, dtype=np.float32), np.asarray(norms, dtype=np.float32).reshape(-1)

    def _run_bound(self, feeds: dict[str, IntArray], device: str) -> list[npt.NDArray[np.float32]]:
        """IOBinding: inputs copied to the device once, outputs allocated there (no ORT staging copies)."""
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._outputs:
            binding.bind_output(name, device, self._device_id)
        self._session.run_with_iobinding(binding)
        outputs: list[npt.NDArray[np.float32]] = binding.copy_outputs_to_cpu()
        return outputs
