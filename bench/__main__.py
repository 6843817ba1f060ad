"""``python -m bench [scenario ...]``: run named scenarios, write their sections of docs/benchmarks.md.

Scenarios (default: all, in this order; the heavy ones last):
  serialize   repeated float vs packed bytes, 3584-dim, 1/32/256 vectors      (issue 6 §5)
  tokenize    batch encode vs per text                                        (issue 6 §6)
  waste       padded-token waste, FIFO vs the service's length grouping       (issue 6 §4)
  coldstart   process start to SERVING per precision                          (issue 6 §7)
  service     service vs raw session                                          (issue 6 §2)
  batching    1/8/32 concurrent clients vs sequential, p50/p95/p99            (issue 6 §3)
  efficiency  tokens per server CPU-second at 1 vs 16 clients, vs raw session (issue 11 §4)
  cache       result cache on vs off, Zipf (s=1.1) query stream, interleaved  (issue 14 §3)
  raw         PyTorch eager vs ORT fp32/fused/chunked/fp16/int8 variants      (issue 6 §1)
  long        peak RSS + latency at 1k…32k tokens, fused vs chunked           (issue 8)
  client      embedding-client overhead, embed-bulk vs capacity, load spreading (issue 13)
  fuzz_http   byte-level HTTP fuzzer vs embed-serve, rounds × 500 examples    (issue 12; docs/reliability.md)
  fuzz        wire-level gRPC fuzzing of embed-serve, rounds × 2000 calls     (issue 12)
  minilm      real MiniLM: plain vs ort-fused fp32, int8 routes, quality       (issue 11 §1–2)
  peers       vs sentence-transformers, fastembed, Infinity (own venvs, PyPI)  (issue 11 §5)

Run one heavy scenario at a time on shared machines; each writes its section as soon as it ends.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench._common import REPORT, Section, write_section

# Scenarios whose figures belong in another document than docs/benchmarks.md.
REPORTS = {"fuzz_http": Path("docs/reliability.md")}

Runner = Callable[[int, bool], Section]


def _scenarios(models: list[str] | None = None) -> dict[str, Runner]:
    from bench import (
        cache_bench,
        client_bench,
        efficiency,
        fuzz_grpc,
        fuzz_http,
        long_input,
        minilm,
        peers,
        raw_model,
        serialization,
        service_load,
        tokenization,
        waste,
    )

    def models_arg(run: Callable[[int, bool, list[str] | None], Section], models: list[str] | None) -> Runner:
        return lambda rounds, quick: run(rounds, quick, models)

    return {
        "serialize": lambda r, q: serialization.run(r, q),
        "tokenize": lambda r, q: tokenization.run(r, q),
        "waste": lambda r, q: waste.run(r, q),
        "coldstart": service_load.run_coldstart,
        "service": service_load.run_service_vs_raw,
        "batching": service_load.run_batching,
        "efficiency": efficiency.run,
        "cache": cache_bench.run,
        "raw": models_arg(raw_model.run, models),
        "long": models_arg(long_input.run, models),
        "client": client_bench.run,
        "fuzz_http": fuzz_http.run,
        "fuzz": fuzz_grpc.run,
        "minilm": lambda r, q: minilm.run(r, q),
        "peers": peers.run,
    }


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP (PyTorch) threads must not spin after a region either, for the same fairness reason as
    # ORT's allow_spinning=0; this has to be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    scenarios = _scenarios()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("scenario", nargs="*", choices=[*scenarios, []], help="default: all")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (median of these)")
    parser.add_argument("--quick", action="store_true", help="smaller grids (smoke test, not for the report)")
    parser.add_argument(
        "--models", help="comma-separated models for raw / long (tiny, 512x12, 0.5b, minilm); default: all"
    )
    args = parser.parse_args(argv)
    scenarios = _scenarios(args.models.split(",") if args.models else None)
    command = "python -m bench " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    failed = []
    for name in args.scenario or list(scenarios):
        print(f"== {name}", flush=True)
        try:
            section = scenarios[name](args.rounds, args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        write_section(section, command.strip(), REPORTS.get(name, REPORT))
        print("\n".join(section.body), flush=True)
    print(f"wrote {REPORT}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
