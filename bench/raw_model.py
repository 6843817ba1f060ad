"""Scenario ``raw``: PyTorch eager fp32 vs the ORT graphs we ship, model only (issue 6 §1, issue 11 §3).

Why these variants: PyTorch eager is what a user would run instead; ``plain`` is the unfused
exporter graph; ``fused`` (opset 23 + GQA pass), ``chunked`` (fused + query-chunked attention +
chunked MLP, qwen2's fp16 default) and ``ort-chunked`` (chunked with attention on ORT's flash
MultiHeadAttention, qwen2's fp32 and int8 default) are ours; int8 is measured the way the service runs it
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

ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
CONTROL_FLOW = {"Loop", "If", "Scan"}  # their kernel time repeats the time of the nodes inside
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


def op_shares(profile_file: Path) -> tuple[float, float]:
    """(GEMM share, attention share) of ORT kernel time, from an ORT profile JSON.

    Nodes inside Loop bodies are profiled on their own, so the Loop's own time is left out.
    """
    events = json.loads(profile_file.read_text())
    total = gemm = attention = 0.0
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name")
        if op in CONTROL_FLOW:
            continue
        dur = float(event.get("dur", 0))
        total += dur
        gemm += dur if op in GEMM_OPS else 0.0
        attention += dur if op in ATTENTION_OPS else 0.0
    return (gemm / total, attention / total) if total else (0.0, 0.0)


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
        "tiny": [(1, 16), (8, 128), (8, 512), (8, 2048)],
        "512x12": [(1, 16), (8, 128), (8, 512), (8, 2048)],
        "0.5b": [(1, 128), (8, 128)],
        "minilm": [(1, 16), (8, 128), (32, 128)],
    }[model]


def _profile_line(model: str, variant: str, path: Path, quick: bool, vocab: int) -> str:
    profiled = _models.session(path, profile=True)
    batch, length = _grid(model, quick)[-1]
    ids, mask = _inputs(batch, length, vocab)
    for _ in range(2):
        profiled.run(None, {"input_ids": ids, "attention_mask": mask})
    gemm, attention = op_shares(Path(profiled.end_profiling()))
    return (
        f"- ORT kernel time, {variant} fp32, {model} {batch}×{length}: GEMM **{gemm:.0%}**, attention "
        f"**{attention:.0%}** (GEMM: the part graph passes cannot speed up)"
    )


def run(rounds: int, quick: bool, models: list[str] | None = None) -> Section:
    import torch

    torch.set_num_threads(2)
    section = Section(
        "raw", "Raw model: PyTorch eager fp32 vs ONNX Runtime variants (issue 6 §1, issue 11 §3)"
    )
    section.add(
        "2 threads on both sides. Time per call, round-robin median of "
        f"{rounds} rounds (spread = (max−min)/median). ×PT = PyTorch eager fp32 time / variant time, "
        "same cell, same run. `int8 per-text` = one unpadded text per `session.run` (how the service runs "
        "`batch_invariant: false` bundles); `int8 dyn batched` is the same graph fed the whole batch "
        "(not served: batch-dependent). `int8_qdq` (static scales) and `int8_pertoken` (per-token scales) "
        "are invariant inside a padded batch, so they run batched. `ort-chunked` = the qwen2 fp32 default "
        "(attention on ORT's flash `MultiHeadAttention`, export/passes/mha_attention.py). Models: random "
        "gte-Qwen2 weights, real Qwen2 vocabulary; shapes in bench/_models.py (`512x12` = hidden 512, 12 "
        "layers, 8 heads of 64, 2 KV heads, intermediate 1408; fp32 graphs only).\n"
    )
    for model in models or ["tiny", "512x12", "0.5b", "minilm"]:
        if model == "minilm":
            from export.assets import minilm_dir

            folder = minilm_dir()
            files = {"ORT plain": _models.minilm_onnx(), "int8": _models.minilm_int8()}
            vocab = 30522
        else:
            folder = _models.checkpoint_dir(_models.SHAPES[model])
            names = ["plain", "fused", "chunked", "ort-chunked"]
            # 512x12 is there for issue 11's targets: fp32 graphs and the served int8 (per-token); its
            # unfused graph and the other int8 routes would double the run
            names = (
                [*names[1:], "int8_pertoken"]
                if model == "512x12"
                else [*names, "int8_dynamic", "int8_qdq", "int8_pertoken"]
            )
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
        print(section.body[-1], flush=True)  # a later model's failure must not lose this one's timings
        ref_name = "ORT plain" if model == "minilm" else ("plain" if "plain" in sessions else "fused")
        q = quality({k: v for k, v in sessions.items() if k != ref_name}, sessions[ref_name], vocab)
        section.add("")
        section.add(
            table(
                ["model", "variant", "min cos vs fp32 graph", "alone vs batched min cos"],
                [[model, k, f"{a:.6f}", f"{b:.6f}"] for k, (a, b) in q.items()],
            )
        )
        if model != "minilm":
            section.add("")
            for variant in ("fused", "ort-chunked"):
                section.add(_profile_line(model, variant, files[variant], quick, vocab))
        section.add("")
        del module, sessions
    return section
