"""Unit tests with no model: the error table, encodings, post-processing, runtime helpers."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service import errors
from service.encoding import check_dimensions, check_encoding, decode, pack, postprocess
from service.errors import StartupError
from service.runtime import check_providers, length_buckets, provider_chain, trt_profiles
from service.settings import Settings

ROWS = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.TooManyInputs, grpc.StatusCode.INVALID_ARGUMENT, 413),
    (errors.InputTooLong, grpc.StatusCode.INVALID_ARGUMENT, 413),
    (errors.UnknownTask, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.DimensionsNotAllowed, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND, 404),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE, 503),
    (errors.Draining, grpc.StatusCode.UNAVAILABLE, 503),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (errors.MessageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (errors.RuntimeFailure, grpc.StatusCode.INTERNAL, 500),
]


@pytest.mark.parametrize(("cls", "code", "http"), ROWS)
def test_error_table_row(cls: type[errors.EmbeddingError], code: grpc.StatusCode, http: int) -> None:
    public = errors.describe(cls("what to fix", field="inputs[2]"), "rid-1")
    assert (public.grpc_code, public.http_status) == (code, http)
    assert public.field == "inputs[2]" and public.error_class == cls.__name__
    if code != grpc.StatusCode.INTERNAL:
        assert public.message == "what to fix"


def test_every_error_class_has_a_row() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.EmbeddingError)
    ]
    assert set(classes) <= {row[0] for row in ROWS} | {errors.EmbeddingError}


def test_internal_details_never_reach_the_client(caplog: pytest.LogCaptureFixture) -> None:
    public = errors.describe(errors.RuntimeFailure("CUDA OOM at 0xdeadbeef in /secret/path"), "rid-9")
    assert "0xdeadbeef" not in public.message and "rid-9" in public.message
    unexpected = errors.describe(KeyError("secret-key"), "rid-7")
    assert unexpected.grpc_code == grpc.StatusCode.INTERNAL and unexpected.http_status == 500
    assert "secret-key" not in unexpected.message
    assert "secret-key" in caplog.text  # …but the log has it


def test_pack_decode_roundtrip_and_layouts() -> None:
    rng = np.random.default_rng(1)
    v = rng.standard_normal((3, 19)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for enc, atol in (("float32", 0), ("float16", 1e-3), ("int8", 0.5 / 127 + 1e-7)):
        blobs = pack(v, enc)  # type: ignore[arg-type]
        got = np.stack([decode(b, enc, 19) for b in blobs])  # type: ignore[arg-type]
        np.testing.assert_allclose(got, v, atol=atol)
    assert pack(v, "float32")[0] == v[0].astype("<f4").tobytes()
    q = np.frombuffer(pack(np.array([[1.0, -1.0, 0.5, -0.004]], dtype=np.float32), "int8")[0], np.int8)
    assert q.tolist() == [127, -127, 64, -1]  # round(v * 127), half to even; clipped
    bits = pack(np.array([[1, -1, 0, 2, -3, 4, 5, -6, 7, -8]], dtype=np.float32), "binary")[0]
    assert bits == bytes([0b10010110, 0b10000000])  # MSB first, 0 → bit 0, padded with 0


def test_postprocess_normalize_and_dimensions() -> None:
    unit = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    norms = np.array([5.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(
        postprocess(unit, norms, normalize=False, dimensions=None), [[3, 4, 0], [0, 0, 2]]
    )
    cut = postprocess(unit, norms, normalize=True, dimensions=1)
    np.testing.assert_allclose(cut, [[1.0], [0.0]])  # renormalised; a zero vector stays zero (no NaN)
    assert postprocess(unit, norms, normalize=False, dimensions=2).tolist() == [[3, 4], [0, 0]]


def test_dimension_and_encoding_checks() -> None:
    check_dimensions(None, model_dims=8, allowed=False)
    check_dimensions(8, model_dims=8, allowed=False)  # the full size is a no-op
    with pytest.raises(errors.DimensionsNotAllowed, match="not enabled"):
        check_dimensions(4, model_dims=8, allowed=False)
    check_dimensions(4, model_dims=8, allowed=True)
    with pytest.raises(errors.DimensionsNotAllowed):
        check_dimensions(9, model_dims=8, allowed=True)
    with pytest.raises(errors.InvalidInput, match="int8"):
        check_encoding("int8", normalize=False)
    check_encoding("binary", normalize=False)


def test_provider_chain_and_trt_profiles(tmp_path: object) -> None:
    assert provider_chain(Settings(provider="cpu"), ["input_ids"], 512) == [("CPUExecutionProvider", {})]
    cuda = provider_chain(
        Settings(provider="cuda", device_id=1, cuda_mem_limit_bytes=1 << 30), ["input_ids"], 512
    )
    assert [name for name, _ in cuda] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda[0][1]["device_id"] == "1" and cuda[0][1]["gpu_mem_limit"] == str(1 << 30)
    trt = provider_chain(
        Settings(provider="tensorrt", trt_bf16=True, max_batch_size=32, max_batch_tokens=4096),
        ["input_ids", "attention_mask"],
        512,
    )
    name, opts = trt[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_bf16_enable"] == "True"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_layer_norm_fp32_fallback"] == "True"
    assert [n for n, _ in trt] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert length_buckets(512) == [64, 128, 256, 512] and length_buckets(64) == [64]
    assert length_buckets(32768)[-1] == 32768
    profiles = trt_profiles(["input_ids"], [64, 128], max_batch_size=32, max_batch_tokens=4096)
    assert profiles["trt_profile_min_shapes"] == "input_ids:1x1,input_ids:1x65"
    assert profiles["trt_profile_max_shapes"] == "input_ids:32x64,input_ids:32x128"
    assert opts["trt_profile_max_shapes"].count("input_ids:") == 4  # one per bucket of 512


def test_provider_fallback_is_detected() -> None:
    check_providers("cpu", ["CPUExecutionProvider"], ["CPUExecutionProvider"], "fail")
    with pytest.raises(StartupError, match="CUDAExecutionProvider was requested"):
        check_providers("cuda", ["CPUExecutionProvider"], ["CPUExecutionProvider"], "fail")
    check_providers("cuda", ["CPUExecutionProvider"], ["CPUExecutionProvider"], "warn")
