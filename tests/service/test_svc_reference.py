"""Served vectors equal the independent PyTorch reference (export.reference) on real bundles.

The ids fed to the reference are built here from the bundle's tokenizer.json and manifest
policy with plain ``tokenizers`` calls, not through service.tokenizer, so a tokenizer bug in the
service shows up as a vector mismatch as well as an ids mismatch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from svc_harness import serving
from tokenizers import Tokenizer

from bundle.manifest import load_manifest
from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "hi",
    "A literal <|endoftext|> and [SEP] stay plain text.",
    "Embeddings map text to vectors; similar meanings land close together in the space.",
]
FP32_MAX_ABS = 1e-4


def independent_ids(bundle: Path, texts: list[str], instruction: str | None = None) -> list[list[int]]:
    manifest = load_manifest(bundle)
    tok = Tokenizer.from_file(str(bundle / manifest.tokenizer.file))
    tok.encode_special_tokens = True
    template = manifest.prompts.query_template
    out = []
    for text in texts:
        rendered = template.format(task=instruction, text=text) if instruction and template else text
        content = tok.encode(rendered, add_special_tokens=False).ids
        out.append([*manifest.tokenizer.prefix_ids, *content, *manifest.tokenizer.suffix_ids])
    return out


def reference_vectors(checkpoint: Path, seqs: list[list[int]]) -> np.ndarray:
    from export.checkpoint import load_checkpoint
    from export.reference import Reference

    ckpt = load_checkpoint(checkpoint)
    ref = Reference(ckpt.family.name, ckpt.config, ckpt.weight_files, ckpt.pooling)
    return np.asarray(ref.encode(seqs).embeddings, dtype=np.float64)


async def check_bundle(bundle: Path, checkpoint: Path, *, query_task: str | None) -> None:
    manifest = load_manifest(bundle)
    instruction = manifest.prompts.tasks[query_task] if query_task else None
    seqs = independent_ids(bundle, DOCS)
    query_seqs = independent_ids(bundle, DOCS[:2], instruction) if query_task else []
    want = reference_vectors(checkpoint, seqs + query_seqs)
    async with serving(bundle, max_batch_wait_ms=5) as h:
        docs = await h.stub.Embed(pb.EmbedRequest(inputs=DOCS, input_type=pb.INPUT_TYPE_DOCUMENT))
        tokens = await h.stub.Tokenize(pb.TokenizeRequest(inputs=DOCS))
        info = await h.stub.GetModelInfo(pb.GetModelInfoRequest())
        got = [list(e.values) for e in docs.embeddings]
        if query_task:
            queries = await h.stub.Embed(
                pb.EmbedRequest(inputs=DOCS[:2], input_type=pb.INPUT_TYPE_QUERY, task=query_task)
            )
            got += [list(e.values) for e in queries.embeddings]
    assert [list(t.ids) for t in tokens.inputs] == seqs
    assert info.self_test.passed and info.self_test.vectors == len(manifest.golden)
    diff = np.abs(np.asarray(got, dtype=np.float64) - want).max()
    assert diff < FP32_MAX_ABS, f"served vs reference max abs diff {diff:.2e}"


async def test_tiny_qwen2_matches_reference(tiny_qwen2_bundle: Path, tiny_qwen2_checkpoint: Path) -> None:
    manifest = load_manifest(tiny_qwen2_bundle)
    task = manifest.prompts.default_task or next(iter(manifest.prompts.tasks))
    await check_bundle(tiny_qwen2_bundle, tiny_qwen2_checkpoint, query_task=task)


async def test_minilm_matches_reference(minilm_bundle: Path) -> None:
    from export.assets import minilm_dir

    await check_bundle(minilm_bundle, minilm_dir(), query_task=None)
