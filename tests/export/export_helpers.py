"""Small helpers shared by the export tests (ORT runs on padded batches, service-style tokenising)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bundle import Manifest, load_manifest
from export.validate import ort_session, run_padded


class BundleRunner:
    """Load a bundle the way the service will: manifest, tokenizer.json, ONNX by path."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self.manifest: Manifest = load_manifest(directory)
        self.session = ort_session(directory / self.manifest.graph.file, threads=1)
        self.tokenizer = Tokenizer.from_file(str(directory / self.manifest.tokenizer.file))
        self.tokenizer.encode_special_tokens = True  # user text can never become a special token

    def ids(self, text: str, *, query_task: str | None = None) -> list[int]:
        spec, prompts = self.manifest.tokenizer, self.manifest.prompts
        if query_task is not None and prompts.query_template is not None:
            text = prompts.query_template.format(task=prompts.tasks[query_task], text=text)
        content = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [*spec.prefix_ids, *content, *spec.suffix_ids]

    def run(self, seqs: Sequence[Sequence[int]], side: str = "right") -> tuple[np.ndarray, np.ndarray]:
        return run_padded(self.session, seqs, self.manifest.tokenizer.pad_id, side)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
