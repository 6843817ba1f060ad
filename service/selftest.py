"""Start-up checks: warm-up and the golden-vector self-test.

Why refuse to start rather than log: a tokenizer that splits text differently from the one the
bundle was validated with, or a provider whose numerics drifted (TensorRT fp16 overflow), still
returns plausible-looking unit vectors. The golden vectors recorded at export time are the only
ground truth the server has, so a mismatch is fatal.
"""

from __future__ import annotations

import logging

import numpy as np

from bundle.manifest import COSINE_BOUND, Manifest
from service.domain import SelfTestResult
from service.errors import EmbeddingError, StartupError
from service.runtime import IntArray, Runtime
from service.settings import Settings
from service.tokenizer import TextTokenizer

log = logging.getLogger("service.selftest")


def cosine_threshold(manifest: Manifest, settings: Settings) -> float:
    """The bundle's precision bound, or the lower one TensorRT was allowed to compute in."""
    bounds = [COSINE_BOUND[manifest.precision]]
    if settings.provider == "tensorrt":
        if settings.trt_fp16:
            bounds.append(COSINE_BOUND["fp16"])
        if settings.trt_bf16:
            bounds.append(COSINE_BOUND["bf16"])
        if settings.trt_int8:
            bounds.append(COSINE_BOUND["int8"])
    return min(bounds)


def warm_up(runtime: Runtime, pad_id: int, *, max_batch_size: int, max_input_tokens: int) -> None:
    """Run a short and a wider shape so first requests do not pay for allocation and kernel choice."""
    for batch, length in (
        (1, min(8, max_input_tokens)),
        (min(8, max_batch_size), min(128, max_input_tokens)),
    ):
        ids: IntArray = np.full((batch, length), pad_id, dtype=np.int64)
        ids[:, 0] = 1 if pad_id != 1 else 2
        runtime.run(ids, np.ones((batch, length), dtype=np.int64))


def self_test(
    manifest: Manifest, tokenizer: TextTokenizer, runtime: Runtime, threshold: float
) -> SelfTestResult:
    """Token ids must match the golden ids exactly; vectors must reach ``threshold`` cosine."""
    if not manifest.golden:
        log.warning("the bundle has no golden vectors; self-test skipped")
        return SelfTestResult(
            ran=False, passed=False, threshold=threshold, message="bundle has no golden vectors"
        )
    worst = 1.0
    for number, golden in enumerate(manifest.golden):
        try:
            (encoded,) = tokenizer.encode_texts(
                [golden.text], input_type=golden.input_type, task=golden.task, truncation="none"
            )
        except EmbeddingError as exc:  # e.g. max_input_tokens set below a golden input's length
            raise StartupError(
                f"self-test: golden input {number} cannot be tokenised: {exc.message}"
            ) from exc
        if list(encoded.ids) != golden.token_ids:
            raise StartupError(
                f"self-test: golden input {number} ({golden.text[:40]!r}) tokenises to different ids "
                f"than at export time (first ids {list(encoded.ids[:8])} vs {golden.token_ids[:8]}): the "
                f"tokenizer ({manifest.tokenizer.file}) or its instruction/EOS policy does not match "
                "the bundle"
            )
        ids: IntArray = np.asarray([encoded.ids], dtype=np.int64)
        vectors, _ = runtime.run(ids, np.ones_like(ids))
        expected = np.asarray(golden.embedding, dtype=np.float64)
        got = vectors[0].astype(np.float64)
        if got.shape != expected.shape:
            raise StartupError(
                f"self-test: golden input {number} has {got.shape[0]} dims, expected {expected.shape[0]}"
            )
        cosine = float(got @ expected / max(np.linalg.norm(got) * np.linalg.norm(expected), 1e-12))
        worst = min(worst, cosine)
        if not cosine >= threshold:  # also catches NaN
            raise StartupError(
                f"self-test: golden input {number} ({golden.text[:40]!r}) has cosine {cosine:.6f} with the "
                f"exported vector, below {threshold} for this precision/provider"
            )
    message = f"{len(manifest.golden)} golden vectors, min cosine {worst:.6f} ≥ {threshold}"
    log.info("self-test passed: %s", message)
    return SelfTestResult(True, True, len(manifest.golden), worst, threshold, message)
