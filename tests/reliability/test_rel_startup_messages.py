"""Every start-up failure names the file or setting and what to do (issue 12 item 10).

Before: a garbage ``tokenizer.json`` (hash updated) ended with "unexpected start-up failure:
Exception('key must be a string…')", and ``--trt-cache-dir`` pointing at a file with "[Errno 17]
File exists". The class is closed by running every loading step inside a named stage
(``service.loader.stage``); the cases below inject a failure into each step.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rel_harness import fixed, refused_start, run_embed_serve, settings_for
from rel_toy import CountingRuntime, rehash


def garbage_tokenizer(bundle: Path) -> None:
    (bundle / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": {"a": "b"}}, 7: 1}')
    rehash(bundle, "tokenizer.json")


def not_a_tokenizer(bundle: Path) -> None:
    (bundle / "tokenizer.json").write_text("{}")
    rehash(bundle, "tokenizer.json")


def test_embed_serve_names_the_file_and_the_setting(rel_toy_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(rel_toy_bundle, tmp_path / "bundle"))
    garbage_tokenizer(bundle)
    proc = run_embed_serve(["--model-dir", str(bundle), "--port", "0", "--http-port", "0"])
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(bundle / "tokenizer.json") in last and "re-export the bundle" in last, last
    assert "unexpected" not in last, last

    cache = tmp_path / "cache-is-a-file"
    cache.write_text("x")
    trt = ["--provider", "tensorrt", "--trt-cache-dir", str(cache)]
    proc = run_embed_serve(["--model-dir", str(rel_toy_bundle), "--port", "0", "--http-port", "0", *trt])
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--trt-cache-dir" in last and str(cache) in last and "directory" in last, last
    assert "Errno" not in last, last


class BrokenRun(CountingRuntime):
    """Fails every call with a message-less library error (what a wedged provider raises)."""

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise KeyError("x")


def _factory_oserror(*_: object) -> CountingRuntime:
    raise OSError(errno.ENOENT, "No such file or directory", "/dev/nvidia0")


Damage = Callable[[Path, Path], dict[str, Any]]


def _tok(damage: Callable[[Path], None]) -> Damage:
    def apply(bundle: Path, _tmp: Path) -> dict[str, Any]:
        damage(bundle)
        return {}

    return apply


def _cache_file(_bundle: Path, tmp: Path) -> dict[str, Any]:
    (tmp / "f").write_text("x")
    return {"settings": {"provider": "tensorrt", "trt_cache_dir": tmp / "f"}}


def _cache_under_file(_bundle: Path, tmp: Path) -> dict[str, Any]:
    (tmp / "g").write_text("x")
    return {"settings": {"provider": "tensorrt", "trt_cache_dir": tmp / "g" / "cache"}}


CASES: dict[str, tuple[Damage, list[str]]] = {
    "garbage-tokenizer": (_tok(garbage_tokenizer), ["tokenizer.json", "re-export the bundle"]),
    "empty-json-tokenizer": (_tok(not_a_tokenizer), ["tokenizer.json", "re-export the bundle"]),
    "cache-is-a-file": (_cache_file, ["--trt-cache-dir", "/f", "is a file"]),
    "cache-under-a-file": (_cache_under_file, ["--trt-cache-dir", "/g/cache", "writable directory"]),
    "factory-oserror": (
        lambda b, t: {"factory": _factory_oserror},
        ["creating the runtime for", "model.onnx", "/dev/nvidia0", "--provider"],
    ),
    "runtime-cannot-run": (
        lambda b, t: {"runtime": BrokenRun()},
        ["first run of model.onnx failed", "KeyError", "provider"],
    ),
    "limit-leaves-no-room": (
        lambda b, t: {"settings": {"max_input_tokens": 2}},
        ["max_input_tokens=2", "--max-input-tokens"],
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(CASES))
async def test_every_startup_failure_names_what_and_how(toy_copy: Path, tmp_path: Path, case: str) -> None:
    damage, fragments = CASES[case]
    plan = damage(toy_copy, tmp_path)
    settings = settings_for(toy_copy, **plan.get("settings", {}))
    factory = plan.get("factory") or fixed(plan.get("runtime"))
    message = await refused_start(settings, fragments, factory)
    assert "unexpected" not in message and "Errno" not in message, message


@pytest.mark.asyncio
async def test_failure_outside_every_stage_still_names_the_bundle(
    toy_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare ValueError/OSError from code outside the named stages (a bug) is not passed on raw."""
    import service.loader

    def broken(*_: object) -> None:
        raise OSError(errno.EEXIST, "File exists")

    monkeypatch.setattr(service.loader, "check_tokenizer", broken)
    message = await refused_start(settings_for(toy_copy), [str(toy_copy), "traceback is in the log"])
    assert "File exists" in message and "Errno" not in message, message
