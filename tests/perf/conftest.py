"""Fixtures for the graph-pass tests: the tiny gte-Qwen2 exported plain (opset 20) and fused (opset 23).

Exported with the project's own ``export.embedder`` + ``export.to_onnx`` (what ships), with external
data forced on so the passes' "rewrite the graph, keep the weight file" path is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def export_tiny(checkpoint: Path, out: Path, opset: int) -> Path:
    from export.checkpoint import load_checkpoint
    from export.embedder import build_embedder
    from export.to_onnx import export_onnx

    ckpt = load_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    export_onnx(
        build_embedder(ckpt),
        path,
        pad_id=ckpt.pad_id,
        vocab_size=ckpt.vocab_size,
        opset=opset,
        external_data="always",
    )
    return path


@pytest.fixture(scope="session")
def plain_onnx(tiny_qwen2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tiny_qwen2_checkpoint, tmp_path_factory.mktemp("perf") / "plain", 20)


@pytest.fixture(scope="session")
def opset23_onnx(tiny_qwen2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tiny_qwen2_checkpoint, tmp_path_factory.mktemp("perf") / "opset23", 23)


def session(path: Path) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def padded_batch(
    lengths: list[int], side: str, vocab: int = 151646, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Texts of ``lengths`` padded to the longest on ``side``; the same seed gives the same texts."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), 151643, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = rng.integers(0, vocab, n)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = tokens
        mask[row, cols] = 1
    return ids, mask
