"""The container runs as non-root: read-only checks on the Dockerfile and the Helm chart."""

from __future__ import annotations

import re

import yaml
from rel_harness import ROOT

DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "embedding-service"


def stages(text: str) -> dict[str, list[str]]:
    """Instructions per build stage (``FROM … AS name``), continuation lines joined."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(1) or f"stage{len(out)}"
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def test_every_serving_image_runs_as_non_root() -> None:
    images = {name: lines for name, lines in stages(DOCKERFILE.read_text()).items()
              if any(line.upper().startswith("ENTRYPOINT") for line in lines)}  # fmt: skip
    assert images, "no stage with an ENTRYPOINT found"
    for name, lines in images.items():
        users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
        assert users, f"stage {name} has no USER: it would run as root"
        user = users[-1].split(":")[0]
        assert user not in ("0", "root"), (name, user)
        last_user = max(i for i, line in enumerate(lines) if line.upper().startswith("USER "))
        last_entry = max(i for i, line in enumerate(lines) if line.upper().startswith("ENTRYPOINT"))
        assert last_user < last_entry, f"stage {name}: USER must come before ENTRYPOINT"


def test_chart_security_context_is_non_root() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pod, container = values["podSecurityContext"], values["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert container["runAsNonRoot"] is True and container["runAsUser"] != 0
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container.get("privileged", False) is False
    assert "ALL" in container["capabilities"]["drop"]
    templates = "\n".join(p.read_text() for p in (CHART / "templates").glob("*.yaml"))
    assert ".Values.securityContext" in templates and ".Values.podSecurityContext" in templates
