"""Chart-created API-key Secrets carry keys-file lines with a name and per-key limits."""

from __future__ import annotations

import base64
from pathlib import Path

from chartlib import Helm

LINES = ["sk-embed-one name=team-a rpm=600 tpm=100000 concurrency=8", "sk-embed-two"]


def test_key_lines_with_limits_reach_the_secret(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("auth:\n  enabled: true\n  keys:\n" + "".join(f'    - "{line}"\n' for line in LINES))
    render = helm.template(values)
    secret = render.one("Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "\n".join(LINES) + "\n"
