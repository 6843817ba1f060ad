"""Models the benchmarks run: checkpoints built offline, exported once, cached under .cache/bench.

Why cached: the 0.5B-shaped export takes about a minute and 2 GB; every scenario (and a re-run
of one) reuses the same files, so repeated runs compare the same graphs. The cache key is the
shape, so changing a shape rebuilds.

Graphs come from the project's own export code (``export.embedder`` + ``export.to_onnx``) and
passes (``export.passes``): what is measured is what ships.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CACHE = Path(".cache/bench")
# bench variant name -> export.quantize method (the same quantiser the export ships)
INT8_VARIANTS = {"int8_dynamic": "dynamic", "int8_qdq": "qdq", "int8_pertoken": "per-token"}


@dataclass(frozen=True)
class Shape:
    """A random gte-Qwen2 shape."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


TINY = Shape("tiny", 64, 2, 4, 2, 128)
HALF_B = Shape("0.5b", 896, 24, 14, 2, 4864)
# Issue 11's "512×12": hidden 512, 12 layers. Heads of 64 like every Qwen2 size, so 8 query heads;
# 2 KV heads (GQA 4:1, between 0.5B's 7:1 and 7B's 7:1 / 1.5B's 6:1); intermediate 1408 =
# 2.75 × hidden, rounded to a multiple of 128 (Qwen2's ratio is ≈ 5.4 but 0.5B/7B differ).
H512_L12 = Shape("512x12", 512, 12, 8, 2, 1408)
SHAPES = {s.name: s for s in (TINY, HALF_B, H512_L12)}


def checkpoint_dir(shape: Shape) -> Path:
    """Build (once) a seeded random gte-Qwen2 folder of ``shape`` with the real Qwen2 vocabulary."""
    from export.assets import build_tiny_qwen2

    folder = CACHE / f"ckpt-{shape.name}"
    stamp = folder / "bench-shape.json"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(shape):
        return folder
    build_tiny_qwen2(
        folder,
        seed=0,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
    )
    stamp.write_text(json.dumps(asdict(shape)))
    return folder


def embedder(folder: Path, dtype: Any = None) -> Any:
    """The PyTorch module that gets exported (the eager reference a user would otherwise run)."""
    import torch

    from export.checkpoint import load_checkpoint
    from export.embedder import build_embedder

    return build_embedder(load_checkpoint(folder), dtype=dtype or torch.float32)


def onnx_file(folder: Path, variant: str, *, query_chunk: int = 1024, mlp_chunk: int | None = 2048) -> Path:
    """Export (once) ``folder`` as graph ``variant``: plain (opset 20), fused, chunked, ort-chunked, fp16,
    int8_dynamic, int8_qdq, int8_pertoken. int8 graphs are quantised by ``export.quantize`` (as the
    export does) from the export's int8 graph (``ort-chunked`` for qwen2, ``chunked`` for qdq) with
    the MLP unchunked (the quantisers do not rewrite MatMuls inside Loop bodies)."""
    out = folder.parent / f"{folder.name}-onnx" / variant / "model.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from export.checkpoint import load_checkpoint
    from export.passes import apply_graph_variant, portable_variant
    from export.quantize import quantize
    from export.to_onnx import export_onnx

    ckpt = load_checkpoint(folder)
    if variant in ("plain", "fused", "fp16"):
        import torch

        dtype = torch.float16 if variant == "fp16" else torch.float32
        module = embedder(folder, dtype)
        opset = 20 if variant == "plain" else 23
        export_onnx(module, out, pad_id=ckpt.pad_id, vocab_size=ckpt.vocab_size, opset=opset)
        if variant != "plain":
            apply_graph_variant(out, "fused")
    elif variant in ("chunked", "ort-chunked"):
        apply_graph_variant(
            onnx_file(folder, "fused"), variant, query_chunk=query_chunk, mlp_chunk=mlp_chunk, out=out
        )
    elif variant in INT8_VARIANTS:
        base = out.parent / "base.onnx"
        method = INT8_VARIANTS[variant]
        graph = ckpt.family.default_graph["int8"]  # the export's int8 graph (ort-chunked for qwen2)
        apply_graph_variant(
            onnx_file(folder, "fused"),
            portable_variant(graph) if method == "qdq" else graph,
            query_chunk=query_chunk,
            mlp_chunk=None,
            out=base,
        )
        quantize(
            base, out, method, calibration_feeds(ckpt.vocab_size) if method in ("qdq", "per-token") else ()
        )
        base.unlink()
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return out


def calibration_feeds(vocab: int, n: int = 8) -> list[dict[str, Any]]:
    """Random-token calibration set (random weights: there is no real text distribution to match)."""
    import numpy as np

    rng = np.random.default_rng(1)
    lengths = [16, 32, 64, 128, 256, 48, 96, 200][:n]
    return [
        {"input_ids": rng.integers(0, vocab, (4, k)), "attention_mask": np.ones((4, k), np.int64)}
        for k in lengths
    ]


def minilm_onnx(variant: str = "plain") -> Path:
    """The real all-MiniLM-L6-v2 exported plain (opset 20), or rewritten into ``ort-fused`` (BERT fp32
    default) by the export's own pass."""
    from export.assets import minilm_dir
    from export.checkpoint import load_checkpoint
    from export.passes import apply_graph_variant
    from export.to_onnx import export_onnx

    out = CACHE / "minilm-onnx" / variant / "model.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if variant != "plain":
        apply_graph_variant(minilm_onnx(), variant, num_heads=12, out=out)  # type: ignore[arg-type]
        return out
    ckpt = load_checkpoint(minilm_dir())
    export_onnx(embedder(minilm_dir()), out, pad_id=ckpt.pad_id, vocab_size=ckpt.vocab_size, opset=20)
    return out


def minilm_int8(method: str = "dynamic", graph: str = "ort-fused") -> Path:
    """The real all-MiniLM-L6-v2 quantised the way ``embed-export --int8-method`` does it (same
    quantiser, same calibration ids: the validation corpus with the export's calibration seed), from
    the export's int8 graph (``ort-fused``: MultiHeadAttention core, Q/K/V still MatMuls) or ``plain``."""
    from export.assets import minilm_dir
    from export.checkpoint import load_checkpoint
    from export.corpus import CorpusTokenizer, validation_sequences
    from export.passes import apply_graph_variant
    from export.precision import CALIBRATED
    from export.quantize import calibration_feeds, quantize

    out = CACHE / "minilm-onnx" / f"int8_{method}_{graph}" / "model.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = minilm_onnx()
        if graph != "plain":
            src = out.parent / "base.onnx"
            apply_graph_variant(minilm_onnx(), graph, num_heads=12, out=src, quantizable=True)  # type: ignore[arg-type]
        ckpt = load_checkpoint(minilm_dir())
        seqs = validation_sequences(CorpusTokenizer(ckpt), ckpt.prompts, 64, seed=1)
        quantize(src, out, method, calibration_feeds(seqs) if method in CALIBRATED else ())  # type: ignore[arg-type]
        if src != minilm_onnx():
            src.unlink()
    return out


def session(path: Path, threads: int = 2, profile: bool = False) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # No spin-waiting after a run: in round-robin timing a spinning ORT pool would steal the cores
    # from whatever variant (PyTorch) runs next and bias every ratio in ORT's favour.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = profile
    if profile:
        CACHE.mkdir(parents=True, exist_ok=True)
        opts.profile_file_prefix = str(CACHE / "ort_profile")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
