"""Bundle integrity and paths: a bad bundle refuses to start, naming the file.

Through ``embed-serve`` as a subprocess (exit status 2 + stderr) for the main cases, and through
``EmbeddingCore.start`` (``StartupError``) for the rest, which is the same code path without the
1–2 s interpreter start.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rel_harness import refused_start, run_embed_serve, settings_for
from rel_toy import build_toy_bundle, edit_manifest, rehash, toy_tokenizer


def tamper(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))


def swap_tokenizer(bundle: Path) -> None:
    """Same words, different ids, re-hashed: only the golden token ids can catch it."""
    toy_tokenizer(permute=True).save(str(bundle / "tokenizer.json"))
    rehash(bundle, "tokenizer.json")


def corrupt_model_rehashed(bundle: Path) -> None:
    """Not an ONNX file at all, but the manifest says it is the right one: ORT must refuse it."""
    (bundle / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf model" * 100)
    rehash(bundle, "model.onnx")


def escape_graph(bundle: Path) -> None:
    shutil.copy(bundle / "model.onnx", bundle.parent / "x.onnx")

    def edit(raw: dict) -> None:
        raw["graph"]["file"] = "../x.onnx"
        raw["files"]["../x.onnx"] = raw["files"]["model.onnx"]

    edit_manifest(bundle, edit)


SUBPROCESS_CASES = {
    "tampered": (tamper, ["model.onnx", "does not match the manifest"]),
    "tokenizer-swapped": (swap_tokenizer, ["tokenizer.json", "golden input 0", "different ids"]),
    "ort-cannot-load": (corrupt_model_rehashed, ["could not create the ONNX Runtime session", "model.onnx"]),
    "graph-escapes": (escape_graph, ["'../x.onnx'", "escapes the bundle directory"]),
}


def test_embed_serve_refuses_bad_bundles(rel_toy_bundle: Path, tmp_path: Path) -> None:
    bundles = {}
    for name, (damage, _) in SUBPROCESS_CASES.items():
        bundle = Path(shutil.copytree(rel_toy_bundle, tmp_path / name / "bundle"))
        damage(bundle)
        bundles[name] = bundle
    with ThreadPoolExecutor(len(bundles)) as pool:  # four interpreters at once: ~2× faster on 2 cores
        runs = dict(
            zip(
                bundles,
                pool.map(lambda b: run_embed_serve(["--model-dir", str(b), "--port", "0"]), bundles.values()),
                strict=True,
            )
        )
    for name, proc in runs.items():
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("embed-serve: error:"), (name, last)
        for fragment in SUBPROCESS_CASES[name][1]:
            assert fragment in last, (name, fragment, last)


def truncate(bundle: Path) -> None:
    data = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(data[: len(data) // 3])


def swap_model_not_rehashed(bundle: Path) -> None:
    other = build_toy_bundle(bundle.parent / "other")
    shutil.copy(other / "model.onnx", bundle / "model.onnx")
    # build_toy_bundle is seeded: make the other model really different.
    tamper(bundle)


def swap_model_rehashed(bundle: Path) -> None:
    """A different (valid) model, manifest re-hashed: the golden vectors catch it."""
    import onnx
    from rel_toy import _graph, embedding_table

    onnx.save(_graph(embedding_table(seed=1)), str(bundle / "model.onnx"))
    rehash(bundle, "model.onnx")


def remove_tokenizer(bundle: Path) -> None:
    (bundle / "tokenizer.json").unlink()


def symlink_out(bundle: Path) -> None:
    outside = bundle.parent / "outside-tokenizer.json"
    shutil.move(bundle / "tokenizer.json", outside)
    os.symlink(outside, bundle / "tokenizer.json")


def absolute_tokenizer(bundle: Path) -> None:
    outside = bundle.parent / "abs-tokenizer.json"
    shutil.copy(bundle / "tokenizer.json", outside)

    def edit(raw: dict) -> None:
        raw["tokenizer"]["file"] = str(outside)
        raw["files"][str(outside)] = raw["files"]["tokenizer.json"]

    edit_manifest(bundle, edit)


def external_data_escapes(bundle: Path) -> None:
    def edit(raw: dict) -> None:
        raw["graph"]["external_data"] = ["../../weights.bin"]
        raw["files"]["../../weights.bin"] = "0" * 64

    edit_manifest(bundle, edit)


def files_entry_escapes(bundle: Path) -> None:
    (bundle.parent / "secret.txt").write_text("not part of the bundle")

    def edit(raw: dict) -> None:
        raw["files"]["../secret.txt"] = "0" * 64

    edit_manifest(bundle, edit)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (truncate, ["model.onnx", "does not match the manifest"]),
        (swap_model_not_rehashed, ["model.onnx", "does not match the manifest"]),
        (swap_model_rehashed, ["self-test", "golden input 0", "cosine"]),
        (remove_tokenizer, ["tokenizer.json", "missing"]),
        (symlink_out, ["tokenizer.json", "escapes the bundle directory"]),
        (absolute_tokenizer, ["abs-tokenizer.json", "escapes the bundle directory"]),
        (external_data_escapes, ["'../../weights.bin'", "escapes the bundle directory"]),
        (files_entry_escapes, ["'../secret.txt'", "escapes the bundle directory"]),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
async def test_core_refuses_bad_bundles(toy_copy: Path, damage, fragments: list[str]) -> None:  # type: ignore[no-untyped-def]
    damage(toy_copy)
    await refused_start(settings_for(toy_copy), fragments)
