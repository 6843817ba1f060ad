"""The efficiency scenario's CPU meter (bench/efficiency.py): /proc's utime + stime, as the kernel counts."""

from __future__ import annotations

import os
import time

from bench.efficiency import cpu_seconds


def test_cpu_seconds_follows_this_process_cpu_time() -> None:
    before, before_own = cpu_seconds(os.getpid()), time.process_time()
    deadline = before_own + 0.3
    while time.process_time() < deadline:  # burn CPU, not wall time
        sum(range(10_000))
    used, used_own = cpu_seconds(os.getpid()) - before, time.process_time() - before_own
    tick = 1 / os.sysconf("SC_CLK_TCK")
    # Same clock (the kernel's per-process CPU accounting), read at 10 ms ticks in /proc.
    assert abs(used - used_own) <= 3 * tick + 0.05 * used_own, (used, used_own)
