"""Export cost per precision for a 0.5B-shaped random Qwen2, and a 7B estimate from the ratios.

``python -m bench.export_bench --work /tmp/export-bench [--precisions fp32,fp16,int8]``

Every step runs ``embed-export`` in a fresh child process; its wall time and peak RSS come from
``os.wait4`` (that child only). The baseline is the same command on the tiny model (hidden 64),
i.e. the libraries plus the exporter's fixed cost, so ``(peak − baseline) / weight bytes`` is the
per-byte memory ratio used for the 7B estimate. Prints a Markdown section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE_05B = {
    "hidden_size": 896,
    "num_layers": 24,
    "num_heads": 14,
    "num_kv_heads": 2,
    "intermediate_size": 4864,
}
PARAMS_7B = 7_069_121_024  # gte-Qwen2-7B encoder (no lm_head), export-feasibility.md §1.1


def _child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS GiB) of that process alone."""
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return wall, usage.ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def _build(folder: Path, shape: dict[str, int], log: Path) -> tuple[float, float]:
    code = (
        "from pathlib import Path; from export.assets import build_tiny_qwen2; "
        f"build_tiny_qwen2(Path({str(folder)!r}), **{shape!r})"
    )
    return _child([sys.executable, "-c", code], log)


def _export(folder: Path, out: Path, precision: str, method: str | None, log: Path) -> tuple[float, float]:
    cmd = [
        sys.executable,
        "-m",
        "export.cli",
        "--model",
        str(folder),
        "--out",
        str(out),
        "--precision",
        precision,
        "--validation-max-length",
        "32",
        "--threads",
        "2",
    ]
    if method:
        cmd += ["--int8-method", method]
    return _child(cmd, log)


def _size_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--precisions", default="fp32,fp16,int8:dynamic,int8:weight-only")
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []

    tiny, big = work / "tiny", work / "qwen2-0.5b-shape"
    if not (tiny / "config.json").exists():
        _build(tiny, {}, work / "build-tiny.log")
    build_wall, build_rss = (0.0, 0.0)
    if not (big / "config.json").exists():
        build_wall, build_rss = _build(big, SHAPE_05B, work / "build-0.5b.log")
    weights_gb = (big / "model.safetensors").stat().st_size / 1e9
    shutil.rmtree(work / "out-tiny", ignore_errors=True)
    base_wall, base_rss = _export(tiny, work / "out-tiny", "fp32", None, work / "export-tiny.log")

    for spec in args.precisions.split(","):
        precision, _, method = spec.partition(":")
        out = work / f"out-{precision}-{method or 'default'}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = _export(big, out, precision, method or None, work / f"export-{precision}-{method}.log")
        manifest = json.loads((out / "manifest.json").read_text())
        rows.append(
            {
                "variant": spec,
                "wall_s": wall,
                "peak_rss_gib": rss,
                "bundle_gb": _size_gb(out),
                "min_cos": manifest["validation"]["min_cos"],
                "graph": manifest["graph"],
            }
        )
        shutil.rmtree(out, ignore_errors=True)

    scale = PARAMS_7B / (weights_gb * 1e9 / 4)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Machine: {platform.node()} {os.cpu_count()} vCPU, Python {platform.python_version()}; {now}.")
    print(f"Command: `python -m bench.export_bench --work {work} --precisions {args.precisions}`.\n")
    print(
        f"0.5B-shaped checkpoint: {weights_gb:.2f} GB fp32 safetensors (built in {build_wall:.0f} s, "
        f"{build_rss:.2f} GiB peak). Baseline (tiny model, same command): {base_wall:.0f} s, "
        f"{base_rss:.2f} GiB peak.\n"
    )
    print(
        "| variant | wall (s) | peak RSS (GiB) | (peak − baseline) / fp32 weight bytes | bundle (GB) "
        "| min cos vs reference |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = (float(r["peak_rss_gib"]) - base_rss) * 1024**3 / (weights_gb * 1e9)  # type: ignore[arg-type]
        r["ratio"] = ratio
        print(
            f"| {r['variant']} | {float(r['wall_s']):.0f} | {float(r['peak_rss_gib']):.2f} | {ratio:.2f} | "  # type: ignore[arg-type]
            f"{float(r['bundle_gb']):.2f} | {float(r['min_cos']):.6f} |"
        )  # type: ignore[arg-type]
    print(f"\n7B estimate (× {scale:.1f} the 0.5B weights, 28.3 GB fp32):\n")
    print("| variant | RAM (GiB) | time (min, linear in bytes: upper bound) |")
    print("|---|---|---|")
    for r in rows:
        ram = base_rss + float(r["ratio"]) * PARAMS_7B * 4 / 1024**3  # type: ignore[arg-type]
        print(f"| {r['variant']} | {ram:.0f} | {float(r['wall_s']) * scale / 60:.0f} |")  # type: ignore[arg-type]
    (work / "results.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
