"""Wire-level gRPC fuzzing, bounded for CI (the longer run is ``python -m bench fuzz``).

Random and mutated protobuf bytes for every method, unary and streaming, with and without a valid
key, against an in-process server wired as ``serve`` wires it (keys, observer, request-bytes
guard). Invariants: never INTERNAL/UNKNOWN, the server keeps SERVING, the key is never logged, and
the server's metrics count every call under the status the client got.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from svc_harness import ThreadedServing

from bench.fuzz_grpc import KEY, fuzz

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(f"{record.getMessage()} {record.__dict__} {record.exc_text or ''}")


def test_wire_fuzz_never_internal_never_dies_never_logs_the_key(toy_bundle: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    captured = _Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(captured)
    root.setLevel(logging.DEBUG)
    try:
        with ThreadedServing(
            toy_bundle, edge=True, api_keys_file=keys, max_message_bytes=64 * 1024, max_inputs_per_request=8
        ) as h:
            report = fuzz(f"127.0.0.1:{h.port}", EXAMPLES, seed=None if os.environ.get("FUZZ_RANDOM") else 0)
            assert h.metrics is not None
            registry = h.metrics.registry

            def recorded(method: str, code: str) -> float:
                labels = {"api": "grpc", "method": method, "code": code}
                return registry.get_sample_value("embed_requests_total", labels) or 0.0

            deadline = time.monotonic() + 30  # the count is taken as the call ends, after the reply
            for (method, code), n in report.by_method.items():
                if method == "Check":
                    continue  # the fuzzer's own health checks are counted too
                while recorded(method, code) != n and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert recorded(method, code) == n, (method, code, n, recorded(method, code))
    finally:
        root.removeHandler(captured)
        root.setLevel(old_level)
    assert report.calls >= EXAMPLES
    # the key reached the server (valid calls were answered) and some calls were refused for it
    assert report.codes["OK"] > 0 and report.codes["UNAUTHENTICATED"] > 0, report.codes
    assert report.codes["INVALID_ARGUMENT"] > 0, report.codes
    leaked = [line for line in captured.text if KEY in line]
    assert not leaked, leaked[:3]
