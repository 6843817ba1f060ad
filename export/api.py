"""``export_bundle``: checkpoint → validated ONNX bundle. The CLI is a thin shell around it.

Steps (each logged with its wall time): resolve the source → check the checkpoint (fails fast,
before any heavy work) → build the stock backbone + pooling head → torch.onnx.export into a
staging folder → precision transform → validate against the independent reference → golden
vectors → hashes → manifest.json last → atomic rename to ``out``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from bundle.manifest import (
    FORMAT_VERSION,
    GoldenVector,
    GraphSpec,
    GraphVariant,
    Manifest,
    ModelShape,
    Pooling,
    Precision,
    TokenizerSpec,
)
from export import precision as prec
from export.checkpoint import Checkpoint, load_checkpoint
from export.corpus import GOLDEN_TEXTS, QUERY, CorpusTokenizer, validation_sequences
from export.errors import ExportError
from export.passes import export_opset, portable_variant, resolve_variant
from export.reference import Reference
from export.source import resolve
from export.to_onnx import ExternalData
from export.validate import gate, measure, ort_session, run_padded
from export.writer import check_output, hash_files, publish, staging

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportOptions:
    """Every knob of an export. ``debug_*`` fields are test hooks that build a *wrong* graph on
    purpose, to prove the validation gate rejects it; they are not exposed by the CLI."""

    revision: str | None = None
    model_id: str | None = None
    opset: int | None = None
    external_data: ExternalData = "auto"
    int8_method: prec.Int8Method = "per-token"
    fp16_mode: prec.Fp16Mode = "mixed"
    max_input_tokens: int | None = None
    validation_max_length: int = 64
    reference_dtype: Literal["auto", "float64", "float32"] = "auto"
    threads: int = 2
    overwrite: bool = False
    debug_causal: bool = False
    debug_pooling: Pooling | None = None
    # Graph passes (export/passes): plain | fused | chunked | ort-fused; None = the family's default.
    graph: GraphVariant | None = None
    # Queries per attention block of the chunked graph; None = sized from heads × max input tokens.
    attention_query_chunk: int | None = None


def _memory() -> str:
    """Current and peak RSS, for the progress log (memory is the 7B export's binding limit)."""
    import resource

    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    info = psutil.Process().memory_full_info()
    # Anonymous memory is what the step really holds; file-backed pages (mmapped checkpoints,
    # external data) count in RSS but the kernel can drop them under pressure.
    anon = (info.rss - getattr(info, "shared", 0)) / 1024**3
    return f"RSS {info.rss / 1024**3:.2f} GiB (≈{anon:.2f} anonymous), peak {peak:.2f} GiB"


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating the next peak)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


@contextmanager
def _step(name: str) -> Iterator[None]:
    started = time.perf_counter()
    log.info("%s …", name)
    yield
    gc.collect()  # free what the step dropped (the torch model, exporter graphs) before the next one
    _trim_heap()
    log.info("%s done in %.1f s (%s)", name, time.perf_counter() - started, _memory())


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Sizes the server's cost model needs (compute and activation memory per batch)."""
    heads = int(config["num_attention_heads"])
    return ModelShape(
        hidden_size=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate_size=int(config["intermediate_size"]),
    )


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _reference(ckpt: Checkpoint, options: ExportOptions) -> Reference:
    import torch

    choice = options.reference_dtype
    if choice == "auto":  # float64 is slow on CPU: worth it only for small models
        choice = "float64" if ckpt.num_parameters_estimate < 200_000_000 else "float32"
    dtype = torch.float64 if choice == "float64" else torch.float32
    return Reference(ckpt.family, ckpt.config, ckpt.weight_files, ckpt.pooling, dtype=dtype)


def _golden(session: object, tok: CorpusTokenizer, ckpt: Checkpoint) -> list[GoldenVector]:
    examples = [tok.example(t) for t in GOLDEN_TEXTS]
    if ckpt.prompts.query_template is not None:
        examples.append(tok.example(QUERY, "query", ckpt.prompts))
    out = []
    for ex in examples:
        emb, _ = run_padded(session, [ex.token_ids], ckpt.pad_id, "right")
        out.append(
            GoldenVector(
                text=ex.text,
                input_type=ex.input_type,
                task=ex.task,
                token_ids=ex.token_ids,
                embedding=[float(v) for v in emb[0]],
            )
        )
    return out


def export_bundle(model: str | Path, out: Path, precision: Precision = "fp32", **options: Any) -> Manifest:
    """Export ``model`` (hub id, folder, or ``builtin:<name>``) to a validated bundle at ``out``.

    Args:
        model: a checkpoint folder, a hub id, ``builtin:all-MiniLM-L6-v2`` or ``builtin:tiny-gte-qwen2``.
        out: the bundle folder; written atomically (staging folder next to it, renamed at the end).
        precision: ``fp32``, ``fp16`` (fp32 norms and residual stream) or ``int8``.
        **options: fields of :class:`ExportOptions`.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        ExportError: a subclass naming what is wrong; no bundle is left at ``out``.
    """
    known = {f.name for f in fields(ExportOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown export options: {', '.join(unknown)}")
    opts = ExportOptions(**options)
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    out = Path(out).expanduser().absolute()
    check_output(out, opts.overwrite)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embed-export-") as scratch:
        with _step("resolving the model source"):
            resolved = resolve(model, Path(scratch), opts.revision)
        with _step(f"checking checkpoint {resolved.folder}"):
            ckpt = load_checkpoint(resolved.folder)
            tok = CorpusTokenizer(ckpt)
        log.info("family %s, pooling %s, dim %d", ckpt.family.name, ckpt.pooling, ckpt.hidden_size)
        default = ckpt.family.default_graph[precision]
        if precision == "int8" and opts.int8_method == "qdq":
            default = portable_variant(default)
        variant = resolve_variant(default, opts.graph, opts.opset)
        opset = export_opset(variant, ckpt.family.opset, opts.opset)
        plan = prec.Plan(
            precision=precision,
            variant=variant,
            opset=opset,
            max_input_tokens=opts.max_input_tokens or ckpt.max_input_tokens,
            external_data=opts.external_data,
            attention_query_chunk=opts.attention_query_chunk,
            int8_method=opts.int8_method,
            fp16_mode=opts.fp16_mode,
            debug_causal=opts.debug_causal,
            debug_pooling=opts.debug_pooling,
        )
        with staging(out) as stage:
            tok.write_bundle_tokenizer(stage / "tokenizer.json")  # fails fast on a tokenizer mismatch
            length = min(opts.validation_max_length, ckpt.max_input_tokens)
            seqs = validation_sequences(tok, ckpt.prompts, length)
            # The reference streams its weights from the checkpoint on each use (LazyWeights), so
            # building it here holds no second copy of the model next to the torch one.
            reference = _reference(ckpt, opts)
            with _step(f"exporting the {precision} graph"):
                artifact = prec.produce(
                    ckpt,
                    stage,
                    MODEL_FILE,
                    plan,
                    fp16_check=prec.Fp16Check(reference, seqs, ckpt.pad_id) if precision == "fp16" else None,
                    # int8 scales/smoothing: the validation corpus drawn with a different seed from the gate's
                    calibration=validation_sequences(tok, ckpt.prompts, length, seed=1)
                    if precision == "int8" and opts.int8_method in prec.CALIBRATED
                    else (),
                )
            with _step("validating against the reference"):
                session = ort_session(stage / MODEL_FILE, opts.threads)
                metrics = gate(
                    measure(session, reference, seqs, ckpt.pad_id), precision, artifact.batch_invariant
                )
                metrics.update(artifact.checks)
                golden = _golden(session, tok, ckpt)
                del session, reference
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                model_id=opts.model_id
                or (resolved.id if resolved.kind != "folder" else resolved.folder.name),
                source=resolved.source(ckpt.content_sha256 if resolved.kind != "hub" else None),
                family=ckpt.family.name,
                model_type=str(ckpt.config["model_type"]),
                pooling=ckpt.pooling,
                dim=ckpt.hidden_size,
                max_input_tokens=opts.max_input_tokens or ckpt.max_input_tokens,
                precision=precision,
                batch_invariant=artifact.batch_invariant,
                graph=GraphSpec(
                    file=MODEL_FILE,
                    external_data=artifact.external_data,
                    opset=opset,
                    attention_query_chunk=artifact.attention_query_chunk,
                    mlp_chunk=artifact.mlp_chunk,
                    variant=variant,
                ),
                shape=model_shape(ckpt.config),
                tokenizer=TokenizerSpec(
                    prefix_ids=ckpt.prefix_ids,
                    suffix_ids=ckpt.suffix_ids,
                    pad_id=ckpt.pad_id,
                    eos_token=ckpt.eos_token,
                    eos_id=ckpt.eos_id,
                    vocab_size=ckpt.tokenizer_vocab_size,
                    lowercase=ckpt.lowercase,
                ),
                prompts=ckpt.prompts,
                versions=_versions(),
                files=hash_files(stage),
                validation=metrics,
                golden=golden,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            manifest.write(stage)
            publish(stage, out)
    log.info("bundle written to %s in %.1f s", out, time.perf_counter() - started)
    return manifest
