"""Pure helpers shared by the scenarios: round-robin timing, statistics, tables, the report file.

Why round-robin: one timing on the 2-core dev VM varies by ±20 %, and drift (another process,
thermal, page cache) over a run is larger than many of the differences we measure. Running one
repetition of every variant per round, then taking medians, makes drift hit all variants alike;
ratios are then taken against a baseline measured in the same rounds.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPORT = Path("docs/benchmarks.md")


@dataclass(frozen=True)
class Stats:
    """Median and spread of repeated timings (seconds)."""

    median: float
    low: float
    high: float
    n: int

    @property
    def spread_pct(self) -> float:
        """(max − min) / median, in percent: how much one timing can be trusted."""
        return 100.0 * (self.high - self.low) / self.median if self.median > 0 else 0.0


def stats(samples: Sequence[float]) -> Stats:
    if not samples:
        raise ValueError("no samples")
    return Stats(statistics.median(samples), min(samples), max(samples), len(samples))


def round_robin(
    variants: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each variant once per round, in the same order every round; returns seconds per variant."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; what load tools report as p50/p99."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 · n), at least 1
    return ordered[min(rank, len(ordered)) - 1]


def padded_waste(batches: Sequence[Sequence[int]]) -> float:
    """Fraction of computed tokens that are padding when each batch is padded to its longest."""
    paid = sum(len(b) * max(b) for b in batches if b)
    real = sum(sum(b) for b in batches)
    return 0.0 if paid == 0 else 1.0 - real / paid


def ratio(value: float, baseline: float) -> float:
    """Speed-up of ``value`` over ``baseline`` when both are durations (>1: faster than baseline)."""
    return baseline / value if value > 0 else float("inf")


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line naming the machine the numbers came from."""
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} logical CPUs{mem}, {system}"


@dataclass
class Section:
    """One scenario's part of docs/benchmarks.md."""

    name: str
    title: str
    body: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.body.append(text)

    def render(self, command: str) -> str:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = [
            f"## {self.title}",
            "",
            f"*Machine:* {machine()}  ",
            f"*Command:* `{command}`  ",
            f"*Date:* {stamp}",
            "",
        ]
        return "\n".join(head + self.body).rstrip() + "\n"


_MARK = "<!-- bench:{name} {edge} -->"


def update_report(text: str, name: str, rendered: str) -> str:
    """Replace (or append) the section delimited by this scenario's markers in ``text``."""
    begin, end = _MARK.format(name=name, edge="begin"), _MARK.format(name=name, edge="end")
    block = f"{begin}\n{rendered}{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block


def write_section(section: Section, command: str, path: Path = REPORT) -> None:
    header = (
        "# Benchmarks\n\nWritten by `python -m bench`; each section is replaced when its scenario is re-run. "
        "Timings are round-robin medians with their spread; every ratio is against a baseline measured "
        "in the same run.\n"
    )
    text = path.read_text() if path.exists() else header
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(update_report(text, section.name, section.render(command)))
