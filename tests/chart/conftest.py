"""Fixtures for the Helm chart tests (helpers live in chartlib.py).

helm is installed by scripts/install-helm.sh into tools/helm/ (git-ignored): the tests never
skip for a missing helm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chartlib import CHART, CI_VALUES, ROOT, Helm, Render


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "install-helm.sh")], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"scripts/install-helm.sh failed:\n{proc.stderr}"
    binary = Path(proc.stdout.strip().splitlines()[-1])
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        # No cluster: make sure nothing talks to one by accident.
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }
    version = subprocess.run(
        [str(binary), "version", "--short"], capture_output=True, text=True, env=env, check=True
    )
    assert version.stdout.startswith("v3."), version.stdout
    return Helm(binary=binary, env=env)


@pytest.fixture(scope="session")
def renders(helm: Helm) -> dict[str, Render]:
    """helm template over every helm/ci/*-values.yaml, keyed by the values file's stem."""
    assert len(CI_VALUES) >= 6, f"the CI matrix is missing values files: {CI_VALUES}"
    return {path.name.removesuffix("-values.yaml"): helm.template(path) for path in CI_VALUES}


@pytest.fixture
def chart_copy(tmp_path: Path) -> Iterator[Callable[[Callable[[Path], None] | None], Path]]:
    """A throwaway copy of the chart, optionally edited (e.g. a bumped Chart.yaml)."""

    def make(edit: Callable[[Path], None] | None = None) -> Path:
        dest = tmp_path / f"chart-{len(list(tmp_path.iterdir()))}" / "embedding-service"
        shutil.copytree(CHART, dest)
        if edit is not None:
            edit(dest)
        return dest

    yield make
