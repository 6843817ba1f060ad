"""OpenAI-shaped HTTP load for the peer benchmark: our HTTP front end and Infinity's server.

Why one client for both: both answer ``POST {"input": [...]} → {"data": [{"embedding": [...]}]}``,
so the same aiohttp closed loop (the HTTP twin of ``service_load.closed_loop``) measures them
alike, including JSON decoding of the float lists, which every HTTP user pays.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


async def http_closed_loop(
    url: str, payloads: list[list[str]], clients: int, model: str | None = None, keep: bool = False
) -> tuple[float, list[float], Counter[str], np.ndarray | None]:
    """``clients`` concurrent callers share ``payloads``; (wall s, latencies s, statuses, vectors)."""
    import aiohttp

    def body(inputs: list[str]) -> dict[str, Any]:
        return {"input": inputs, **({"model": model} if model else {})}

    queue = list(reversed(list(enumerate(payloads))))
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    vectors: dict[int, list[list[float]]] = {}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients), timeout=timeout
    ) as session:
        async with session.post(url, json=body(payloads[0])) as warm:  # connection + warm-up
            await warm.read()

        async def client() -> None:
            while queue:
                index, inputs = queue.pop()
                start = time.perf_counter()
                async with session.post(url, json=body(inputs)) as resp:
                    data = await resp.json() if resp.status == 200 else await resp.read()
                    codes[str(resp.status)] += 1
                latencies.append(time.perf_counter() - start)
                if keep and isinstance(data, dict):
                    rows = sorted(data["data"], key=lambda d: d["index"])
                    vectors[index] = [d["embedding"] for d in rows]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    kept = None
    if keep:
        kept = np.asarray([v for i in range(len(payloads)) for v in vectors[i]], np.float32)
    return wall, latencies, codes, kept


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600.0) -> float:
    """Poll ``url`` until it answers 200; seconds waited. Fails early if the process exits."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise RuntimeError(f"server exited rc {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
