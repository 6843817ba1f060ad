"""Scenario ``minilm``: the real all-MiniLM-L6-v2, raw ONNX Runtime session, pre-tokenised real text
(issue 11 §1–2): plain vs ``ort-fused`` fp32 graph, and the int8 routes, in one interleaved run.

Corpus: paragraphs of the Python standard library's own docstrings (real English prose that ships
with every Python installation; no generated strings). Documents are whole paragraphs (≤ 256
tokens, the model's limit); queries are their first sentences. Bulk = every document once, in
batches of 32 grouped by length (as the service batches); single = one query per ``run``.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import _models
from bench._common import Section, fmt_ms, round_robin, stats, table

_MODULES = (
    "json", "argparse", "logging", "collections", "functools", "itertools", "pathlib", "subprocess",
    "asyncio", "unittest", "email.message", "http.client", "decimal", "fractions", "statistics",
    "random", "string", "textwrap", "difflib", "csv", "sqlite3", "zipfile", "tarfile", "shutil",
    "tempfile", "inspect", "ast", "typing", "threading", "socket",
)  # fmt: skip


def corpus(limit: int = 400) -> list[str]:
    """Distinct docstring paragraphs of 60–1500 characters, in a fixed order."""
    seen: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            module = importlib.import_module(name)
            for attr in sorted(dir(module)):
                doc = getattr(getattr(module, attr, None), "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(para.split())
                    if 60 <= len(text) <= 1500 and not text.startswith((">>>", "Return")):
                        seen.setdefault(text, None)
    return list(seen)[:limit]


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0][:200]


def tokenize(texts: list[str]) -> list[list[int]]:
    """The bundle's policy: [CLS] + content (≤ 254) + [SEP], lower-cased by the tokenizer itself."""
    from tokenizers import Tokenizer

    from export.assets import minilm_dir

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return [[101, *tok.encode(t, add_special_tokens=False).ids[:254], 102] for t in texts]


def batches(seqs: list[list[int]], size: int) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    """Length-grouped, right-padded batches and the corpus index of each row."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        width = max(len(seqs[i]) for i in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, : len(seqs[i])] = seqs[i]
            mask[r, : len(seqs[i])] = 1
        out.append((ids, mask, rows))
    return out


def encode(sess: Any, seqs: list[list[int]], size: int) -> np.ndarray:
    out = np.zeros((len(seqs), 384), np.float32)
    for ids, mask, rows in batches(seqs, size):
        out[rows] = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return out


def top10_overlap(q: np.ndarray, d: np.ndarray, q_ref: np.ndarray, d_ref: np.ndarray) -> tuple[float, float]:
    """Mean and min share of each query's top-10 documents that the fp32 ranking also has."""
    got = np.argsort(-(q @ d.T), axis=1)[:, :10]
    want = np.argsort(-(q_ref @ d_ref.T), axis=1)[:, :10]
    shares = [len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)]
    return float(np.mean(shares)), float(np.min(shares))


def variants() -> dict[str, tuple[Path, bool]]:
    """name → (graph, batched?). Batch-dependent int8 (dynamic) is served one text per run. int8
    graphs are quantised from the export's int8 graph (``ort-fused``: MultiHeadAttention core) unless
    the name says ``plain graph`` (the int8 default before; kept to show what the core fusion buys)."""
    return {
        "fp32 plain": (_models.minilm_onnx(), True),
        "fp32 ort-fused": (_models.minilm_onnx("ort-fused"), True),
        "int8 dynamic (one text per run)": (_models.minilm_int8("dynamic"), False),
        "int8 per-token, plain graph": (_models.minilm_int8("per-token", "plain"), True),
        "int8 per-token (default)": (_models.minilm_int8("per-token"), True),
    }


def run(rounds: int, quick: bool) -> Section:
    texts = corpus(120 if quick else 400)
    docs = tokenize(texts)
    queries = tokenize([first_sentence(t) for t in texts])
    graphs = variants()
    sessions = {name: _models.session(path) for name, (path, _) in graphs.items()}
    load = os.getloadavg()[0]
    bulk: dict[str, Callable[[], object]] = {}
    for name, sess in sessions.items():
        size = 32 if graphs[name][1] else 1
        bulk[name] = lambda s=sess, n=size: encode(s, docs, n)
    bulk_t = round_robin(bulk, rounds)
    # Single queries interleaved per query (every variant runs the same query back to back), so
    # load drift on the shared machine hits all variants alike even at millisecond scale.
    single_t: dict[str, list[float]] = {name: [] for name in sessions}
    for query in queries[:50] * rounds:
        fns = {name: lambda s=sess, q=query: encode(s, [q], 1) for name, sess in sessions.items()}
        for name, times in round_robin(fns, 1, warmup=0).items():
            single_t[name] += times
    base = stats(bulk_t["fp32 plain"]).median
    mean_len = float(np.mean([len(s) for s in docs]))
    section = Section("minilm", "all-MiniLM-L6-v2: fused graph and int8, raw ORT session (issue 11 §1–2)")
    section.add(
        "Raw `onnxruntime.InferenceSession`, 2 intra-op threads, no spinning; pre-tokenised. "
        f"Corpus: {len(docs)} standard-library docstring paragraphs (mean {mean_len:.0f} tokens, "
        f"max {max(len(s) for s in docs)}) as documents, their first sentences as queries. "
        "Bulk = all documents, batches of 32 grouped by length (int8 dynamic: one text per run, as "
        "served). Single = 50 queries, one per run, every variant on the same query back to back, "
        f"median over all. Bulk: medians of {rounds} interleaved rounds (every variant once per round); "
        "ratios against fp32 plain from the same rounds — the machine is shared with other engineers' "
        f"jobs (1-minute load average {load:.1f} on 2 CPUs when the timed phases began), so only ratios "
        "mean much. int8 graphs are quantised from the export's int8 graph (`ort-fused`: "
        "MultiHeadAttention core) unless the row says plain graph.\n"
    )
    rows = []
    for name in graphs:
        b, s = stats(bulk_t[name]), stats(single_t[name])
        rows.append(
            [
                name,
                f"{len(docs) / b.median:.1f}",
                f"{b.spread_pct:.0f}%",
                f"{base / b.median:.2f}",
                fmt_ms(s.median),
                f"{stats(single_t['fp32 plain']).median / s.median:.2f}",
            ]
        )
    section.add(
        table(
            ["variant", "bulk texts/s", "spread", "bulk ×plain", "single query ms (median)", "single ×plain"],
            rows,
        )
    )
    ref_d, ref_q = encode(sessions["fp32 plain"], docs, 1), encode(sessions["fp32 plain"], queries, 1)
    quality = []
    for name, sess in sessions.items():
        alone_d, alone_q = encode(sess, docs, 1), encode(sess, queries, 1)
        batched_d = encode(sess, docs, 32)
        cos_alone = min((alone_d * ref_d).sum(-1).min(), (alone_q * ref_q).sum(-1).min())
        cos_batched = (batched_d * ref_d).sum(-1).min()
        served_d = batched_d if graphs[name][1] else alone_d
        mean_o, min_o = top10_overlap(alone_q, served_d, ref_q, ref_d)
        quality.append(
            [
                name,
                f"{cos_alone:.6f}",
                f"{cos_batched:.6f}",
                f"{np.abs(batched_d - alone_d).max():.1e}",
                f"{mean_o:.3f} / {min_o:.1f}",
            ]
        )
    section.add("")
    section.add(
        table(
            [
                "variant",
                "min cos to fp32, alone",
                "min cos to fp32, batched 32",
                "max abs alone vs batched",
                "top-10 overlap with fp32 (mean / min)",
            ],
            quality,
        )
    )
    section.add("")
    section.add(time_shares({n: graphs[n][0] for n in ("fp32 ort-fused", "int8 per-token (default)")}, docs))
    return section


# FLOPs per padded token of all-MiniLM-L6-v2's O projection (384×384) and MLP (2 × 384×1536), 6 layers,
# 2 FLOPs per multiply-add: what the fused fp32 graph's MatMul kernels compute.
_OTHER_PROJ_FLOPS = 2 * (384 * 384 + 2 * 384 * 1536) * 6
_SHOWN = 6  # op types listed by name; the rest are summed


def time_shares(graphs: dict[str, Path], docs: list[list[int]]) -> str:
    """Where each graph's bulk time goes (ORT profile of one pass over the documents), and the fp32
    GEMM rate: MatMul kernel time against the FLOPs of the projections it runs (O and the MLP; Q/K/V
    run inside ``Attention``), the evidence for how much faster fp32 bulk could still get."""
    import json

    padded = sum(ids.size for ids, _, _ in batches(docs, 32))
    rows = []
    for name, path in graphs.items():
        sess = _models.session(path, profile=True)
        encode(sess, docs, 32)
        profile = Path(sess.end_profiling())
        by_op: dict[str, float] = {}
        for event in json.loads(profile.read_text()):
            if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
                op = event["args"]["op_name"]
                by_op[op] = by_op.get(op, 0.0) + float(event["dur"]) / 1e6
        profile.unlink()
        total = sum(by_op.values())
        top = [kv for kv in sorted(by_op.items(), key=lambda kv: -kv[1]) if kv[1] >= 0.01 * total][:_SHOWN]
        shares = [f"{op} {t / total:.0%}" for op, t in top]
        shares.append(f"other {1 - sum(t for _, t in top) / total:.0%}")
        fp32 = "MatMulIntegerToFloat" not in by_op
        rate = f"{_OTHER_PROJ_FLOPS * padded / by_op['MatMul'] / 1e9:.0f}" if fp32 else "–"
        rows.append([name, f"{total:.2f}", ", ".join(shares), rate])
    return (
        f"Where the bulk time goes (ORT profile, one pass over the {len(docs)} documents, {padded} padded "
        "tokens, 2 threads; each node's wall time, summed; the machine is shared, so the shares matter, the "
        "absolute seconds less):\n\n"
        + table(["graph", "kernel s", "share by op type", "fp32 MatMul GFLOP/s (O + MLP projections)"], rows)
    )
