"""``embed-bulk`` command line: arguments, progress bar, SIGINT, exit codes.

Exit codes: 0 done; 1 stopped (no progress, bad credentials, unusable output); 2 bad arguments;
130 interrupted (the output is consistent: rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from embedding_client._codec import EmbedParams
from embedding_client.aio import AsyncEmbeddingClient
from embedding_client.bulk.runner import Fatal, Plan, Runner, Stalled
from embedding_client.bulk.sink import OutputError, Sink
from embedding_client.bulk.source import Source
from embedding_client.errors import EmbeddingError
from embedding_client.options import TLSConfig

EXIT_STOPPED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embed-bulk", description="Embed a JSONL or Parquet corpus into Parquet."
    )
    p.add_argument("input", type=Path, help="input file: .jsonl (one JSON object per line) or .parquet")
    p.add_argument("--out", type=Path, required=True, help="output directory (Parquet parts + _model.json)")
    p.add_argument("--target", default="127.0.0.1:50051", help="server host:port or gRPC target URI")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="input format (default: from the suffix)")
    p.add_argument("--input-type", choices=["document", "query"], default="document")
    p.add_argument("--task")
    p.add_argument("--instruction")
    p.add_argument("--truncation", choices=["none", "end", "start"], help="default: the server's")
    p.add_argument("--batch-size", type=int, default=64, help="texts per request")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out first")
    p.add_argument("--api-key", help="API key (default: $EMBED_API_KEY)")
    p.add_argument("--tls", action="store_true", help="TLS with the system roots")
    p.add_argument("--tls-ca", type=Path, help="CA bundle (PEM) that signed the server certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mTLS)")
    p.add_argument("--tls-server-name", help="name to verify in the server certificate")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each request, seconds")
    p.add_argument("--stall-timeout", type=float, default=300.0, help="stop after this long without progress")
    p.add_argument("--rows-per-part", type=int, default=100_000, help="max rows per output part file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TLSConfig(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


class _Bar:
    """tqdm bar: rows/s and ETA from tqdm, tokens/s as a postfix."""

    def __init__(self, total: int, initial: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.started = time.monotonic()
        self.tokens = 0
        self.bar = tqdm(total=total, initial=initial, unit="rows", disable=quiet, dynamic_ncols=True)

    def update(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tokens/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


def _model(info: Any, params: EmbedParams) -> dict[str, Any]:
    return {
        "model": info.model,
        "model_id": info.model_id,
        "bundle_sha256": info.bundle_sha256,
        "dimensions": info.dimensions,
        "precision": info.precision,
        "input_type": params.input_type,
        "task": params.task or (info.default_task if params.input_type == "query" else None),
        "instruction": params.instruction,
        "truncation": params.truncation,
    }


async def _main(args: argparse.Namespace) -> int:
    source = Source(args.input, args.text_field, args.id_field, args.format)
    params = EmbedParams(args.input_type, args.task, args.instruction, None, args.truncation)
    client = AsyncEmbeddingClient(
        args.target,
        api_key=args.api_key or os.environ.get("EMBED_API_KEY"),
        tls=_tls(args),
        timeout=args.timeout,
        max_in_flight=1,
    )
    async with client:
        info = await client.model_info()
        sink = Sink(args.out, _model(info, params), resume=args.resume, overwrite=args.overwrite)
        plan = Plan(
            params=params,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            stall_timeout_s=args.stall_timeout,
            part_rows=args.rows_per_part,
        )
        runner = Runner(client, sink, plan, info.dimensions)
        start = sink.progress.rows_done
        bar = _Bar(source.total(), start, args.quiet)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        finished = False
        started = time.monotonic()
        try:
            finished = await runner.run(source.rows(skip=start), stop, bar.update)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            bar.close()
            sink.close(finished)
    p = sink.progress
    elapsed = max(time.monotonic() - started, 1e-9)
    done = p.rows_done - start
    rate = f"this run: {done} rows in {elapsed:.1f} s ({done / elapsed:.1f} rows/s)"
    where = f"{p.vectors} vectors, {p.errors} refused rows ({args.out / '_errors.jsonl'}); {rate}"
    if not finished:
        print(f"embed-bulk: interrupted after {p.rows_done} input rows ({where}); "
              "rerun with --resume to continue", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    print(f"embed-bulk: done, {p.rows_done} input rows: {where} in {args.out}", file=sys.stderr)
    return 0


def _missing_extra() -> str | None:
    for module in ("pyarrow", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    missing = _missing_extra()
    if missing:
        print(f"embed-bulk needs {missing}: pip install 'embedding-client[bulk]'", file=sys.stderr)
        return EXIT_USAGE
    if args.batch_size < 1 or args.concurrency < 1 or args.rows_per_part < 1:
        print("embed-bulk: --batch-size, --concurrency and --rows-per-part must be ≥ 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_main(args))
    except (FileNotFoundError, ValueError, OutputError) as exc:
        print(f"embed-bulk: {exc}", file=sys.stderr)
        return EXIT_USAGE if not isinstance(exc, OutputError) else EXIT_STOPPED
    except Stalled as exc:
        print(f"embed-bulk: stopped, {exc}. Progress so far is kept: rerun with --resume.", file=sys.stderr)
        return EXIT_STOPPED
    except Fatal as exc:
        print(f"embed-bulk: stopped, the server refused the credentials: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except EmbeddingError as exc:  # model_info at start-up (unreachable server, bad TLS…)
        print(f"embed-bulk: cannot start: {exc}", file=sys.stderr)
        return EXIT_STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
