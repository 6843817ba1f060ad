"""One definition each (issue 15 items 5 and 6): the shared names are the same objects everywhere."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import bundle.manifest as manifest
import service.domain as domain
import service.errors as errors
import service.settings as settings
from service import batcher, encoding, selftest, servicer

ROOT = Path(__file__).resolve().parents[2]


def _assigned(path: Path) -> set[str]:
    """Names bound by a top-level assignment or class in ``path`` (not imports)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
    return names


def test_shared_literals_and_tables_have_one_definition() -> None:
    assert settings.Truncation is domain.Truncation
    assert domain.InputType is manifest.InputType
    assert selftest.COSINE_BOUND is manifest.COSINE_BOUND
    defined = {
        path.relative_to(ROOT).as_posix(): _assigned(path)
        for folder in ("service", "bundle", "export")
        for path in (ROOT / folder).rglob("*.py")
        if "pb" not in path.parts
    }
    for name, home in {
        "Truncation": "service/domain.py",
        "InputType": "bundle/manifest.py",
        "COSINE_BOUND": "bundle/manifest.py",
        "StartupError": "service/errors.py",
    }.items():
        assert [p for p, names in defined.items() if name in names] == [home], name
    # ENCODINGS is the servicer's enum → name map only; the names are the Encoding literal.
    assert [p for p, names in defined.items() if "ENCODINGS" in names] == ["service/servicer.py"]
    assert not hasattr(encoding, "ENCODINGS") and not hasattr(domain, "ENCODINGS")
    assert domain.ModelInfo.__dataclass_fields__["encodings"].default == get_args(domain.Encoding)
    assert set(servicer.ENCODINGS.values()) == set(get_args(domain.Encoding))


def test_export_gate_uses_the_shared_cosine_bounds() -> None:
    from export.validate import TOLERANCES

    for precision, tolerance in TOLERANCES.items():
        assert tolerance.min_cos == manifest.COSINE_BOUND[precision]


def test_dead_names_are_gone() -> None:
    assert not hasattr(errors, "Cancelled")
    assert "runtime_calls" not in (ROOT / "service" / "batcher.py").read_text()
    assert not hasattr(batcher.Batcher, "runtime_calls")
