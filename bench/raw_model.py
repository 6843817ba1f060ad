"""Scenario ``raw``: PyTorch eager fp32 vs the ORT graphs we ship, model only (issue 6 §1).

Why these variants: PyTorch eager is what a user would run instead; ``plain`` is the unfused
exporter graph; ``fused`` (opset 23 + GQA pass) and ``chunked`` (fused + query-chunked attention +
chunked MLP, the qwen2 default) are ours; int8 is measured the way the service runs it
(``per-text``: one unpadded text per ``run``, the batch-invariant route) and batched for
reference, and static QDQ is the route that is invariant inside a padded batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import _models
from bench._common import Section, fmt_ms, ratio, round_robin, stats, table

GEMM_OPS = {
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearMatMul",
    "MatMulNBits",
}


def gemm_share(profile_file: Path) -> float:
    """Share of ORT kernel time spent in matrix-multiply kernels, from an ORT profile JSON."""
    events = json.loads(profile_file.read_text())
    total = 0.0
    gemm = 0.0
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        dur = float(event.get("dur", 0))
        total += dur
        if event.get("args", {}).get("op_name") in GEMM_OPS:
            gemm += dur
    return gemm / total if total else 0.0


def _inputs(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, length)), np.ones((batch, length), np.int64)


def _torch_fn(module: Any, ids: np.ndarray, mask: np.ndarray) -> Callable[[], object]:
    import torch

    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def run() -> object:
        with torch.inference_mode():
            return module(t_ids, t_mask)

    return run


def _ort_fn(sess: Any, ids: np.ndarray, mask: np.ndarray, per_text: bool = False) -> Callable[[], object]:
    if per_text:
        rows = [
            ({"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}) for i in range(ids.shape[0])
        ]
        return lambda: [sess.run(None, feed) for feed in rows]
    feed = {"input_ids": ids, "attention_mask": mask}
    return lambda: sess.run(None, feed)


def quality(sessions: dict[str, Any], reference: Any, vocab: int) -> dict[str, tuple[float, float]]:
    """(min cosine to the fp32 reference graph, min cosine alone vs inside a padded batch)."""
    rng = np.random.default_rng(7)
    lengths = [20, 100, 64, 128, 7, 128, 40, 90]
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, vocab, n)
        mask[row, :n] = 1
    ref = reference.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    out: dict[str, tuple[float, float]] = {}
    for name, sess in sessions.items():
        batched = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        alone = np.concatenate(
            [
                sess.run(None, {"input_ids": ids[r : r + 1, :n], "attention_mask": mask[r : r + 1, :n]})[0]
                for r, n in enumerate(lengths)
            ]
        )
        out[name] = (float((batched * ref).sum(-1).min()), float((batched * alone).sum(-1).min()))
    return out


def _grid(model: str, quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(1, 16), (8, 64)]
    return {
        "tiny": [(1, 16), (8, 128), (8, 512)],
        "0.5b": [(1, 128), (8, 128)],
        "minilm": [(1, 16), (8, 128), (32, 128)],
    }[model]


def run(rounds: int, quick: bool, models: list[str] | None = None) -> Section:
    import torch

    torch.set_num_threads(2)
    section = Section("raw", "Raw model: PyTorch eager fp32 vs ONNX Runtime variants (issue 6 §1)")
    section.add(
        "2 threads on both sides. Time per call, round-robin median of "
        f"{rounds} rounds (spread = (max−min)/median). ×PT = PyTorch eager fp32 time / variant time, "
        "same cell, same run. `int8 per-text` = one unpadded text per `session.run` (how the service runs "
        "`batch_invariant: false` bundles); `int8 dyn batched` is the same graph fed the whole batch "
        "(not served: batch-dependent). `int8_qdq` (static scales) and `int8_pertoken` (per-token scales) "
        "are invariant inside a padded batch, so they run batched.\n"
    )
    for model in models or ["tiny", "0.5b", "minilm"]:
        if model == "minilm":
            from export.assets import minilm_dir

            folder = minilm_dir()
            files = {"ORT plain": _models.minilm_onnx(), "int8": _models.minilm_int8()}
            vocab = 30522
        else:
            folder = _models.checkpoint_dir(_models.SHAPES[model])
            names = ["plain", "fused", "chunked", "int8_dynamic", "int8_qdq", "int8_pertoken"]
            names += ["fp16"] if model == "tiny" else []
            files = {n: _models.onnx_file(folder, n) for n in names}
            vocab = 151646
        module = _models.embedder(folder)
        sessions = {name: _models.session(path) for name, path in files.items()}
        rows = []
        for batch, length in _grid(model, quick):
            ids, mask = _inputs(batch, length, vocab)
            fns: dict[str, Callable[[], object]] = {"PyTorch eager fp32": _torch_fn(module, ids, mask)}
            for name, sess in sessions.items():
                if name in ("int8_dynamic", "int8"):  # served one text per run; batched for reference
                    fns[f"{name} per-text"] = _ort_fn(sess, ids, mask, per_text=True)
                    fns[f"{name} batched"] = _ort_fn(sess, ids, mask)
                else:
                    fns[name] = _ort_fn(sess, ids, mask)
            samples = round_robin(fns, rounds)
            base = stats(samples["PyTorch eager fp32"]).median
            for name, values in samples.items():
                st = stats(values)
                rows.append(
                    [
                        model,
                        f"{batch}×{length}",
                        name,
                        fmt_ms(st.median),
                        f"{st.spread_pct:.0f}%",
                        f"{ratio(st.median, base):.2f}",
                    ]
                )
        section.add(table(["model", "batch×len", "variant", "ms", "spread", "×PT"], rows))
        ref_name = "ORT plain" if model == "minilm" else "plain"
        q = quality({k: v for k, v in sessions.items() if k != ref_name}, sessions[ref_name], vocab)
        section.add("")
        section.add(
            table(
                ["model", "variant", "min cos vs fp32 graph", "alone vs batched min cos"],
                [[model, k, f"{a:.6f}", f"{b:.6f}"] for k, (a, b) in q.items()],
            )
        )
        if model != "minilm":
            profiled = _models.session(files["fused"], profile=True)
            ids, mask = _inputs(*_grid(model, quick)[-1], vocab)
            for _ in range(3):
                profiled.run(None, {"input_ids": ids, "attention_mask": mask})
            share = gemm_share(Path(profiled.end_profiling()))
            section.add(
                f"\nGEMM share of ORT kernel time (fused fp32, {model}, largest cell): **{share:.0%}** — "
                "the part fusion cannot touch; it bounds the fp32 gain over PyTorch.\n"
            )
        section.add("")
        del module, sessions
    return section
