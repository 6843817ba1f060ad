"""The reference is right on its own terms: it matches stock transformers (bidirectional) and a
peer implementation (sentence-transformers), and it can tell causal from bidirectional."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.assets import minilm_dir
from export.checkpoint import load_checkpoint
from export.embedder import build_embedder
from export.reference import Reference

SEQS = [[9707, 11, 1879, 0, 151643], [108386, 3837, 151643], [151643], [5, 6, 7, 8, 9, 10, 11, 151643]]


def _hf(ckpt_dir: Path, causal: bool) -> np.ndarray:
    embedder = build_embedder(load_checkpoint(ckpt_dir), causal=causal)
    width = max(len(s) for s in SEQS)
    ids = torch.full((len(SEQS), width), 151643)
    mask = torch.zeros((len(SEQS), width), dtype=torch.long)
    for row, seq in enumerate(SEQS):  # left padding: the harder case for last-token pooling
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    with torch.no_grad():
        return embedder(ids, mask)[0].double().numpy()


def test_qwen2_reference_matches_bidirectional_transformers(tiny_qwen2_checkpoint: Path) -> None:
    ckpt = load_checkpoint(tiny_qwen2_checkpoint)
    bidi = Reference("qwen2", ckpt.config, ckpt.weight_files, "last_token").encode(SEQS).embeddings
    causal = (
        Reference("qwen2", ckpt.config, ckpt.weight_files, "last_token", causal=True).encode(SEQS).embeddings
    )
    hf_bidi, hf_causal = _hf(tiny_qwen2_checkpoint, False), _hf(tiny_qwen2_checkpoint, True)
    assert np.abs(hf_bidi - bidi).max() < 1e-5
    assert np.abs(hf_causal - causal).max() < 1e-5  # the oracle models causal correctly too …
    assert np.abs(bidi - causal)[[0, 1, 3]].max() > 1e-2  # … and the two are far apart
    assert np.abs(bidi[2] - causal[2]).max() < 1e-9  # a single token sees the same either way


def test_bert_reference_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    ckpt = load_checkpoint(minilm_dir())
    texts = ["Hello world", "A much longer sentence about cats, dogs and 你好.", "x"]
    st = SentenceTransformer(str(ckpt.folder), device="cpu")
    peer = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True).astype(np.float64)
    seqs = [st.tokenizer(t)["input_ids"] for t in texts]
    ours = Reference("bert", ckpt.config, ckpt.weight_files, "mean").encode(seqs).embeddings
    assert np.abs(ours - peer).max() < 1e-5


def test_unsupported_reference_features_are_export_errors() -> None:
    """They must reach the CLI's error mapping (clear message, exit code), not a traceback."""
    import pytest
    import torch

    from export.errors import UnsupportedArchitecture
    from export.reference_models import qwen2_encode

    config = {"hidden_size": 8, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn"}}
    with pytest.raises(UnsupportedArchitecture, match="yarn"):
        qwen2_encode({"norm.weight": torch.ones(8)}, config, [[1, 2]])
