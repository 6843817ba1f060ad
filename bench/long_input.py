"""Scenario ``long``: peak RSS and latency of one input at 1k…32k tokens, fused vs chunked (issue 8).

Why a fresh subprocess per cell: peak RSS (``VmHWM``) is a process-lifetime peak, so cells must
not share a process (``ru_maxrss`` is not used: Linux carries it over from the forking parent);
and an address-space limit (``RLIMIT_AS``) turns a runaway S² allocation into a
clean failure instead of the OOM killer taking the machine. Unchunked attention is never run
past 16k tokens (it tries to allocate ≥ 16 GB at 32k).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench import _models
from bench._common import Section, table

LENGTHS = [1024, 4096, 8192, 16384, 32768]
UNCHUNKED_MAX = 16384
ADDRESS_LIMIT = 12 * 1024**3

_CELL = """
import json, resource, sys, time
import numpy as np, onnxruntime as ort
path, length, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
opts = ort.SessionOptions(); opts.intra_op_num_threads = 2; opts.log_severity_level = 3
def hwm_kb():  # VmHWM: this process's peak RSS; unlike ru_maxrss it is not inherited across fork+exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
loaded = hwm_kb()
ids = np.random.default_rng(0).integers(0, 151646, (1, length)); mask = np.ones((1, length), np.int64)
start = time.perf_counter()
out = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
took = time.perf_counter() - start
print(json.dumps({"s": took, "peak_mb": hwm_kb() / 1024,
                  "loaded_mb": loaded / 1024, "head": out[0, :4].tolist()}))
"""


def run_cell(path: Path, length: int, timeout: float = 900.0) -> dict[str, object]:
    """One graph × one length in a fresh, address-space-limited process; returns its JSON or an error."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CELL, str(path), str(length), str(ADDRESS_LIMIT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"rc {proc.returncode}: {last[:160]}", "wall": time.perf_counter() - started}
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def plan(model: str, quick: bool) -> list[int]:
    """Lengths per model. The 0.5B shape is compute-bound past 8k on 2 cores (≈ 4 min at 16k,
    ≈ 14 min at 32k by FLOP count), so it stops at 8k here; the memory trend is visible by then."""
    if quick:
        return [1024, 4096]
    return LENGTHS if model == "tiny" else [1024, 4096, 8192]


def run(rounds: int, quick: bool, models: list[str] | None = None) -> Section:
    del rounds  # one cold run per cell: the quantity is the peak, not a median
    section = Section("long", "Long inputs: peak RSS and latency of one input (issue 8)")
    section.add(
        "One input of S tokens, batch 1, fresh process per cell, "
        f"`RLIMIT_AS` = {ADDRESS_LIMIT / 1024**3:.0f} GiB, "
        "ORT CPU, 2 threads. Peak = `VmHWM` of the cell process (includes the loaded session, "
        "column *loaded*). "
        "`fused` = opset-23 Attention in one piece (S² scores); `chunked` = key-padding mask + query blocks "
        "of 1024 + MLP blocks of 2048 (qwen2's fp16/int8 graph); `ort-chunked` = chunked with attention on "
        "ORT's flash `MultiHeadAttention` (qwen2's fp32 graph). Unchunked graphs are not run past 16k.\n"
    )
    rows = []
    for model in models or ["tiny", "0.5b"]:
        folder = _models.checkpoint_dir(_models.SHAPES[model])
        graphs = {name: _models.onnx_file(folder, name) for name in ("fused", "chunked", "ort-chunked")}
        for length in plan(model, quick):
            heads = {}
            for name, path in graphs.items():
                if name == "fused" and length > UNCHUNKED_MAX:
                    rows.append([model, length, name, "not run (rule: unchunked ≤ 16k)", "", "", ""])
                    continue
                cell = run_cell(path, length)
                if "error" in cell:
                    rows.append([model, length, name, f"failed: {cell['error']}", "", "", ""])
                    continue
                heads[name] = cell["head"]
                rows.append(
                    [
                        model,
                        length,
                        name,
                        f"{float(cell['peak_mb']):.0f}",  # type: ignore[arg-type]
                        f"{float(cell['loaded_mb']):.0f}",
                        f"{float(cell['s']):.2f}",
                        "",
                    ]
                )  # type: ignore[arg-type]
            if "fused" in heads:
                import numpy as np

                for row in rows[-len(graphs) :]:  # one row per graph for this length
                    if row[2] != "fused" and row[2] in heads:
                        diff = np.abs(np.asarray(heads["fused"]) - np.asarray(heads[str(row[2])])).max()
                        row[-1] = f"{float(diff):.1e}"
    section.add(
        table(
            [
                "model",
                "tokens",
                "graph",
                "peak RSS MB",
                "loaded MB",
                "latency s",
                "max abs Δ vs fused (4 dims)",
            ],
            rows,
        )
    )
    return section
