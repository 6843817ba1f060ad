"""Start-up refuses bad bundles, missing providers and failed self-tests; OrtRuntime paths."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from svc_harness import settings_for
from svc_toy import CLS, SEP, reference

from bundle.manifest import load_manifest
from service.core import EmbeddingCore
from service.errors import StartupError
from service.runtime import OrtRuntime

pytestmark = pytest.mark.asyncio


def copy_bundle(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        path = dst / "manifest.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return dst


async def start_fails(bundle: Path, match: str, **overrides: Any) -> None:
    core = EmbeddingCore(settings_for(bundle, **overrides))
    with pytest.raises(StartupError, match=match):
        await core.start()
    assert core.state == "failed" and not core.serving
    await core.close()


async def test_hash_mismatch(toy_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(toy_bundle, tmp_path / "b")
    with (bundle / "tokenizer.json").open("a") as fh:
        fh.write(" ")
    await start_fails(bundle, "tokenizer.json does not match the manifest")


async def test_bad_manifest(toy_bundle: Path, tmp_path: Path) -> None:
    await start_fails(
        copy_bundle(toy_bundle, tmp_path / "v", lambda d: d.update(format_version=99)), "format_version"
    )
    await start_fails(copy_bundle(toy_bundle, tmp_path / "x", lambda d: d.pop("dim")), "dim")
    await start_fails(tmp_path / "missing", "does not exist")


async def test_golden_vector_mismatch(toy_bundle: Path, tmp_path: Path) -> None:
    def flip(data: dict[str, Any]) -> None:
        data["golden"][0]["embedding"] = [-v for v in data["golden"][0]["embedding"]]

    await start_fails(copy_bundle(toy_bundle, tmp_path / "g", flip), "cosine -1.0")


async def test_tokenizer_mismatch(toy_bundle: Path, tmp_path: Path) -> None:
    def other_ids(data: dict[str, Any]) -> None:
        data["golden"][1]["token_ids"] = [*data["golden"][1]["token_ids"][:-2], SEP]

    await start_fails(copy_bundle(toy_bundle, tmp_path / "t", other_ids), "tokenises to different ids")


async def test_self_test_can_be_disabled(toy_bundle: Path, tmp_path: Path) -> None:
    def flip(data: dict[str, Any]) -> None:
        data["golden"][0]["embedding"] = [-v for v in data["golden"][0]["embedding"]]

    core = EmbeddingCore(settings_for(copy_bundle(toy_bundle, tmp_path / "g", flip), self_test=False))
    await core.start()
    assert core.serving and core.model_info().self_test.ran is False
    await core.close()


async def test_wanted_provider_missing_fails_or_warns(
    toy_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The CPU build of onnxruntime has no CUDA: ORT would silently run on CPU.
    await start_fails(toy_bundle, "CUDAExecutionProvider was requested", provider="cuda")
    core = EmbeddingCore(settings_for(toy_bundle, provider="cuda", provider_fallback="warn"))
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        await core.start()
    assert core.model_info().execution_providers == ("CPUExecutionProvider",)
    assert "provider_fallback=warn" in caplog.text
    await core.close()


async def test_session_creation_failure(toy_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(toy_bundle, tmp_path / "s")
    (bundle / "model.onnx").write_bytes(b"not an onnx graph")

    def rehash(data: dict[str, Any]) -> None:
        from bundle.manifest import file_sha256

        data["files"]["model.onnx"] = file_sha256(bundle / "model.onnx")

    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    rehash(data)
    path.write_text(json.dumps(data))
    await start_fails(bundle, "could not create the ONNX Runtime session")


async def test_ort_runtime_and_io_binding_path(toy_bundle: Path, toy_table: np.ndarray) -> None:
    manifest = load_manifest(toy_bundle)
    runtime = OrtRuntime(settings_for(toy_bundle), manifest, toy_bundle, max_input_tokens=32)
    ids = np.array([[CLS, 40, 41, SEP, 0], [CLS, 42, SEP, 0, 0]], dtype=np.int64)
    mask = (np.arange(5)[None, :] < np.array([[4], [3]])).astype(np.int64)
    vectors, norms = runtime.run(ids, mask)
    want, want_norms = reference(toy_table, [[CLS, 40, 41, SEP], [CLS, 42, SEP]])
    np.testing.assert_allclose(vectors, want, atol=1e-6)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-6)
    runtime._bind_device = "cpu"  # the CUDA IOBinding code path, bound to host memory here
    bound, bound_norms = runtime.run(ids, mask)
    np.testing.assert_allclose(bound, vectors, atol=1e-7)
    assert bound_norms.shape == (2,)


async def test_ort_threads_do_not_spin_between_runs(toy_bundle: Path) -> None:
    """A spinning pool burns the cores the event loop and the tokeniser share with it."""
    manifest = load_manifest(toy_bundle)
    runtime = OrtRuntime(settings_for(toy_bundle), manifest, toy_bundle, max_input_tokens=32)
    options = runtime._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
