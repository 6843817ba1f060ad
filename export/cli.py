"""``embed-export``: the command-line face of :func:`export.api.export_bundle`.

Exit codes: 0 bundle written; 1 other export error; 2 source; 3 unsupported architecture;
4 broken checkpoint; 5 tokenizer mismatch; 6 output not writable; 7 quantisation check;
8 validation gate failed. Nothing is left at ``--out`` unless the exit code is 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bundle.manifest import GRAPH_VARIANTS, Manifest
from export.errors import ExportError
from export.families import supported_summary
from export.quantize import INT8_METHODS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embed-export",
        description="Export a Hugging Face checkpoint to a validated ONNX embedding bundle. "
        f"Supported families: {supported_summary()}.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="hub id, checkpoint folder, builtin:all-MiniLM-L6-v2 or builtin:tiny-gte-qwen2",
    )
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument(
        "--int8-method",
        choices=list(INT8_METHODS),
        default="per-token",
        help="per-token (default): smoothed W8A8 with one activation scale per token, batch invariant "
        "(served batched); dynamic: batch-dependent (served one text per run); "
        "weight-only: MatMulNBits, CPU/CUDA, batch invariant; qdq: static QDQ for TensorRT",
    )
    p.add_argument("--revision", help="hub revision (commit, tag or branch)")
    p.add_argument("--model-id", help="name recorded in the manifest (default: source id)")
    p.add_argument(
        "--external-data",
        choices=["auto", "always", "never"],
        default="auto",
        help="weights in a side file: auto = when the model passes 2 GB",
    )
    p.add_argument(
        "--graph",
        choices=list(GRAPH_VARIANTS),
        default=None,
        help="graph passes: fused = opset-23 Attention/RoPE/RMSNorm + GQA; chunked = fused + query-chunked "
        "attention and MLP (bounded memory to 32k tokens); ort-fused = BERT attention as ONNX Runtime's "
        "com.microsoft.Attention (int8: MultiHeadAttention, projections quantised); ort-chunked = chunked "
        "with qwen2 attention on ONNX Runtime's flash MultiHeadAttention (fp32). Default: ort-chunked for "
        "qwen2 fp32/int8, chunked for qwen2 fp16; ort-fused for bert fp32 and int8, plain otherwise; int8 "
        "qdq: the same without ORT contrib ops (chunked / plain)",
    )
    p.add_argument("--attention-query-chunk", type=int, help="queries per attention block (chunked graph)")
    p.add_argument("--max-input-tokens", type=int, help="override the model's input limit")
    p.add_argument("--validation-max-length", type=int, default=64, help="longest validation sequence")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for validation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return p


def quiet_libraries() -> None:
    """The exporter stack logs hundreds of INFO lines per export; keep ours, drop theirs."""
    for name in (
        "onnxscript",
        "onnx_ir",
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "torch._dynamo",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    # onnxruntime.quantization warns on the root logger ("consider pre-processing"): not actionable.
    logging.getLogger().setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    except ImportError:  # pragma: no cover - transformers is a hard dependency of export
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console script's status)."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s embed-export %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("export")
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if args.quiet else logging.INFO)
    logger.propagate = False
    # SIGTERM (a CI timeout, a job being stopped) becomes SystemExit, so the staging folder's
    # cleanup runs instead of leaving a hidden .partial-* folder behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    quiet_libraries()
    from export.api import export_bundle

    try:
        manifest = export_bundle(
            args.model,
            args.out,
            args.precision,
            revision=args.revision,
            model_id=args.model_id,
            int8_method=args.int8_method,
            external_data=args.external_data,
            max_input_tokens=args.max_input_tokens,
            graph=args.graph,
            attention_query_chunk=args.attention_query_chunk,
            validation_max_length=args.validation_max_length,
            threads=args.threads,
            overwrite=args.overwrite,
        )
    except ExportError as exc:
        print(f"embed-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        logger.removeHandler(handler)
    if not args.quiet:
        print(summary(args.out, manifest))
    return 0


def summary(out: Path, manifest: Manifest) -> str:
    """The last line of a successful export: the numbers the gate judged, not ungated ones (a
    batch-dependent bundle is gated on its unpadded runs; its batched runs are only recorded)."""
    checks = manifest.validation
    gated = checks.get("gated_min_cos", checks.get("min_cos"))
    return (
        f"{out}: {manifest.family} {manifest.precision} bundle, dim {manifest.dim}, graph "
        f"{manifest.graph.variant}, validation passed: max_abs {checks.get('max_abs')}, min_cos {gated} "
        f"(gated on {checks.get('gated_on', 'all runs')})"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
