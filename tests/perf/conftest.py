"""Fixtures for the graph-pass tests: the tiny gte-Qwen2 exported plain (opset 20) and fused (opset 23).

Exported with the project's own ``export.embedder`` + ``export.to_onnx`` (what ships), with external
data forced on so the passes' "rewrite the graph, keep the weight file" path is exercised.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
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


def square_values(path: Path, probe: Path, seq: int = 1000) -> list[str]:
    """Top-level values with two axes of length ``seq`` when run at S = ``seq`` (S² memory).

    Every intermediate is exposed as a graph output in a copy at ``probe`` and the graph is run
    on a right-padded batch of ``seq`` and 400 tokens.
    """
    model = onnx.load(str(path))
    declared = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in declared:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
    onnx.save(model, str(probe))
    ids, mask = padded_batch([seq, 400], "right", seed=3)
    sess = session(probe)
    names = [o.name for o in sess.get_outputs()]  # type: ignore[attr-defined]
    values = sess.run(None, {"input_ids": ids, "attention_mask": mask})  # type: ignore[attr-defined]
    return [n for n, v in zip(names, values, strict=True) if sum(d == seq for d in np.shape(v)) >= 2]


def copy_graph(src: Path, dst_dir: Path) -> Path:
    """Copy a graph and its side files into ``dst_dir`` (passes rewrite in place)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        shutil.copy(f, dst_dir / f.name)
    return dst_dir / src.name
