"""The client distribution installs alone (its own deps only) and embeds against a live server.

A fresh virtual environment, ``pip install`` of a copy of ``client/`` (pip reuses its wheel
cache), then a script run from outside the repository: none of the server's packages may be
importable there, and the vector it gets must be the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from client_support import toy_truth
from rel_harness import Live

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"embedding-client", "grpcio", "numpy", "protobuf", "pip", "setuptools", "typing-extensions"}
SERVER_ONLY = ["service", "bundle", "export", "onnxruntime", "tokenizers", "pydantic", "aiohttp", "torch"]
SCRIPT = """
import importlib.util, json, sys
present = [m for m in {server_only!r} if importlib.util.find_spec(m) is not None]
from embedding_client import EmbeddingClient
with EmbeddingClient(sys.argv[1]) as client:
    vectors = client.embed(["w1 w2 w3", "w4"])
    print(json.dumps({{"present": present, "dtype": str(vectors.dtype), "vectors": vectors.tolist(),
                      "health": client.health()}}))
"""


@pytest.mark.slow
def test_client_installs_alone_and_embeds(live: Live, tmp_path: Path) -> None:
    source = tmp_path / "client"
    shutil.copytree(
        ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(source)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )  # fmt: skip
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert names <= ALLOWED, names - ALLOWED
    run = subprocess.run(
        [str(python), "-c", SCRIPT.format(server_only=SERVER_ONLY), live.grpc_target],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["present"] == [] and out["dtype"] == "float32" and out["health"] == "SERVING"
    np.testing.assert_allclose(np.array(out["vectors"]), toy_truth(["w1 w2 w3", "w4"]), atol=1e-5)
    # The CLI is installed but needs the `bulk` extra: it says so instead of a traceback.
    bulk = subprocess.run(
        [str(venv / "bin" / "embed-bulk"), "in.jsonl", "--out", "out"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert bulk.returncode == 2 and "embedding-client[bulk]" in bulk.stderr, bulk.stderr
