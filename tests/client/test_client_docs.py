"""docs/client.md's example runs as written (target replaced) against a server on a real port."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from rel_harness import Live

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def test_documented_example_runs(live: Live, tmp_path: Path) -> None:
    found = re.search(r"<!-- client-example.*?-->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert found, "docs/client.md lost its client-example block"
    code = found.group(1).replace("127.0.0.1:50051", live.grpc_target)
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "best match:" in run.stdout and "refused: inputs[1]" in run.stdout and "SERVING" in run.stdout
