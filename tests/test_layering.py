"""Import contracts (issue 15 item 7), checked on the source tree by ``make test``.

* ``service/`` (what runs in production) never imports ``export``, torch, transformers or onnx:
  the serving image has none of them, and a stray import would only fail there.
* ``client/`` (the ``embedding-client`` distribution) never imports the server (``service``,
  ``bundle``, ``export``): it is installed alone into calling services.

Imports are read from the AST (including ones inside functions and ``TYPE_CHECKING`` blocks),
so a lazy import cannot slip through.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = {
    "service": {"export", "torch", "transformers", "onnx"},
    "client/embedding_client": {"service", "bundle", "export"},
}


def imported_roots(source: str) -> set[str]:
    """Top-level packages a module imports (absolute imports only; relative ones stay inside)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def violations(package: str, forbidden: set[str]) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for root in sorted(imported_roots(path.read_text()) & forbidden):
            found.append(f"{path.relative_to(ROOT)} imports {root}")
    return found


@pytest.mark.parametrize("package", sorted(CONTRACTS))
def test_import_contract(package: str) -> None:
    assert (ROOT / package).is_dir()
    assert violations(package, CONTRACTS[package]) == []


def test_the_check_sees_every_import_form() -> None:
    source = (
        "import onnx.helper\nfrom export.api import x\nimport os\nfrom . import sibling\n"
        "def f():\n    import torch\n    from transformers import AutoModel\n"
        "import onnxruntime\n"
    )
    assert imported_roots(source) & CONTRACTS["service"] == {"onnx", "export", "torch", "transformers"}
