"""The README's "Talk to it" section, run as a newcomer would after ``make serve``.

Not in the dev environment (which has grpcurl and openai anyway, and would hide a missing
install): a copy of the repository gets the environment ``make serve`` builds for this section
(``scripts/bootstrap.sh talk``, the line scripts/serve-default.sh runs), and every block of the
section runs there, with only that environment's ``bin`` on PATH, against a server on real
ports. The model-serving extras (onnxruntime, torch) are left out: they do not change what the
second shell has, and the server here is the toy bundle's (named like the default model).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from rel_harness import ThreadedServer

ROOT = Path(__file__).resolve().parents[2]
COPY = ["pyproject.toml", "README.md", "bundle", "export", "service", "client", "scripts"]
JUNK = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", ".venv")


def talk_blocks() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Talk to it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def test_serve_installs_the_talk_extra_and_passes_args_through() -> None:
    serve = (ROOT / "scripts" / "serve-default.sh").read_text()
    assert "scripts/bootstrap.sh talk" in serve and '"$@"' in serve
    assert "scripts/serve-default.sh $(ARGS)" in (ROOT / "Makefile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["talk"]) <= set(extras["dev"])  # the tests that run these commands have them too
    kinds = [kind for kind, _ in talk_blocks()]
    assert kinds.count("bash") == 1 and kinds.count("python") == 2, kinds


@pytest.mark.slow
def test_talk_to_it_in_the_make_serve_environment(client_bundle: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=JUNK)
        else:
            shutil.copy2(source, repo / name)
    base = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    base["PATH"] = os.pathsep.join(
        p for p in base.get("PATH", "").split(os.pathsep) if Path(p).resolve() != Path(sys.executable).parent
    )
    python = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    install = subprocess.run(
        ["bash", "scripts/bootstrap.sh", "talk"], cwd=repo, env={**base, "PYTHON": python},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    # Issue 15: the license must use the SPDX string form (no setuptools deprecation warning).
    assert "project.license` as a TOML table is deprecated" not in install.stderr
    venv_bin = repo / ".venv" / "bin"
    env = {**base, "PATH": os.pathsep.join([str(venv_bin), "/usr/bin", "/bin"])}
    blocks = talk_blocks()
    with ThreadedServer(client_bundle, model_name="all-MiniLM-L6-v2") as live:
        for kind, code in blocks:
            code = code.replace("50051", str(live.grpc_port)).replace("8080", str(live.http_port))
            if kind == "bash":
                # Everything the newcomer types, from a fresh shell at the repository root.
                env_shell = {k: v for k, v in env.items() if k != "PATH"} | {"PATH": "/usr/bin:/bin"}
                cmd = ["bash", "-euo", "pipefail", "-c", code]
                run = subprocess.run(
                    cmd, cwd=repo, env=env_shell, capture_output=True, text=True, timeout=300
                )
                assert run.returncode == 0, f"{code}\n{run.stderr[-3000:]}"
                assert '"status": "SERVING"' in run.stdout and "embedding.v1.EmbeddingService" in run.stdout
            else:
                cmd = [str(venv_bin / "python"), "-c", code]
                run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
                assert run.returncode == 0, f"{code}\n{run.stderr[-3000:]}"
                assert run.stdout.strip(), code
