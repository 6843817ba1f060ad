"""The bundle contract the service relies on: graph I/O, padding-side and batch invariance,
unnormalised vectors via ``embedding_norm``, and the tokenizer policy (EOS once, prompts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from export_helpers import BundleRunner, cosine

from bundle import load_manifest, verify_files
from export.checkpoint import load_checkpoint
from export.reference import Reference

TEXTS = ["Hello, world!", "你好，世界！今天天气很好。", "Emoji 🍕🎉👍🏽 test", "short", "x " * 40]


@pytest.fixture(scope="module", params=["tiny_qwen2_bundle", "minilm_bundle"])
def runner(request: pytest.FixtureRequest) -> BundleRunner:
    return BundleRunner(request.getfixturevalue(request.param))


def test_graph_io_contract(runner: BundleRunner, request: pytest.FixtureRequest) -> None:
    graph = runner.manifest.graph
    inputs = {i.name: i for i in runner.session.get_inputs()}  # type: ignore[attr-defined]
    outputs = {o.name: o for o in runner.session.get_outputs()}  # type: ignore[attr-defined]
    assert list(inputs) == graph.inputs == ["input_ids", "attention_mask"]
    assert list(outputs) == graph.outputs == ["sentence_embedding", "embedding_norm"]
    for tensor in inputs.values():
        assert tensor.type == "tensor(int64)" and len(tensor.shape) == 2
        assert all(isinstance(d, str) for d in tensor.shape), "batch and seq must be dynamic"
    assert outputs["sentence_embedding"].type == "tensor(float)"
    assert outputs["sentence_embedding"].shape[1] == runner.manifest.dim
    assert outputs["embedding_norm"].type == "tensor(float)" and len(outputs["embedding_norm"].shape) == 1


def test_opset_and_external_data(tiny_qwen2_bundle: Path) -> None:
    manifest = load_manifest(tiny_qwen2_bundle)
    verify_files(tiny_qwen2_bundle, manifest)
    model = onnx.load(str(tiny_qwen2_bundle / manifest.graph.file), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == manifest.graph.opset
    external = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert external and external <= set(manifest.graph.external_data)


@pytest.mark.parametrize("side", ["left", "right"])
def test_onnx_matches_reference_and_norm(runner: BundleRunner, side: str) -> None:
    ckpt_dir = None if runner.manifest.family == "bert" else runner.manifest.source.id
    from export.assets import minilm_dir

    ckpt = load_checkpoint(Path(ckpt_dir) if ckpt_dir else minilm_dir())
    ref = Reference(ckpt.family.name, ckpt.config, ckpt.weight_files, ckpt.pooling)
    seqs = [runner.ids(t) for t in TEXTS]
    emb, norm = runner.run(seqs, side)
    want = ref.encode(seqs)
    assert np.abs(emb - want.embeddings).max() < 1e-4
    np.testing.assert_allclose(norm, want.norms, rtol=1e-4)
    # Unnormalised vector = normalised × norm: what the service returns for normalize=false.
    unnormalised = emb * norm[:, None]
    assert np.abs(unnormalised - want.embeddings * want.norms[:, None]).max() < 1e-3 * want.norms.max()


def test_padding_side_and_batch_invariance(runner: BundleRunner) -> None:
    seqs = [runner.ids(t) for t in TEXTS]
    alone = np.concatenate([runner.run([s])[0] for s in seqs])
    left, right = runner.run(seqs, "left")[0], runner.run(seqs, "right")[0]
    assert cosine(left, alone).min() > 0.9999
    assert cosine(right, alone).min() > 0.9999
    assert np.abs(left - right).max() < 1e-5


def test_single_token_input(tiny_qwen2_bundle: Path) -> None:
    runner = BundleRunner(tiny_qwen2_bundle)
    emb, norm = runner.run([[151643]])
    assert emb.shape == (1, 64) and np.isfinite(emb).all() and norm[0] > 0


def test_golden_ids_reproduced_by_service_path(runner: BundleRunner) -> None:
    """The service's tokenizer path (tokenizers + manifest policy) gives the golden ids that the
    export computed with the transformers tokenizer, and the graph gives the golden vectors."""
    assert len(runner.manifest.golden) >= 4
    for golden in runner.manifest.golden:
        task = golden.task if golden.input_type == "query" else None
        ids = runner.ids(golden.text, query_task=task)
        assert ids == golden.token_ids, golden.text
        emb, _ = runner.run([ids])
        assert np.abs(emb[0] - np.array(golden.embedding)).max() < 1e-5


def test_qwen2_eos_exactly_once_and_not_injectable(tiny_qwen2_bundle: Path) -> None:
    runner = BundleRunner(tiny_qwen2_bundle)
    for golden in runner.manifest.golden:
        assert golden.token_ids[-1] == 151643
        assert golden.token_ids.count(151643) == 1, golden.text  # incl. a text spelling <|endoftext|>
    assert any("<|endoftext|>" in g.text for g in runner.manifest.golden)


def test_qwen2_instruction_on_queries_only(tiny_qwen2_bundle: Path) -> None:
    runner = BundleRunner(tiny_qwen2_bundle)
    prompts = runner.manifest.prompts
    assert prompts.query_template == "Instruct: {task}\nQuery: {text}"
    assert prompts.default_task == "web_search"
    queries = [g for g in runner.manifest.golden if g.input_type == "query"]
    documents = [g for g in runner.manifest.golden if g.input_type == "document"]
    assert queries and documents
    instruct = runner.tokenizer.encode("Instruct:", add_special_tokens=False).ids
    for q in queries:
        assert q.task == "web_search" and q.token_ids[: len(instruct)] == instruct
        assert q.token_ids != runner.ids(q.text)  # the same text as a document differs
    for d in documents:
        assert d.token_ids[: len(instruct)] != instruct


def test_bert_policy(minilm_bundle: Path) -> None:
    runner = BundleRunner(minilm_bundle)
    assert runner.manifest.prompts.query_template is None
    for golden in runner.manifest.golden:
        assert golden.token_ids[0] == 101 and golden.token_ids[-1] == 102
        assert golden.token_ids.count(102) == 1  # "[SEP]" in user text stays plain text


def test_minilm_matches_sentence_transformers(minilm_bundle: Path) -> None:
    """A peer implementation (not ours) agrees with the exported graph within 1e-5."""
    from sentence_transformers import SentenceTransformer

    from export.assets import minilm_dir

    texts = ["The cat sits outside", "A man is playing guitar.", "你好，世界", "I love pasta 🍝", "a"]
    peer = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    runner = BundleRunner(minilm_bundle)
    emb, _ = runner.run([runner.ids(t) for t in texts], "right")
    assert np.abs(emb - peer).max() < 1e-5
    emb_left, _ = runner.run([runner.ids(t) for t in texts], "left")
    assert np.abs(emb_left - peer).max() < 1e-5


def test_manifest_records_shape_and_chunks_for_the_cost_model(
    tiny_qwen2_checkpoint: Path, tiny_qwen2_bundle: Path
) -> None:
    """The server sizes batches from these (service/cost.py); they must match the checkpoint."""
    config = load_checkpoint(tiny_qwen2_checkpoint).config
    manifest = load_manifest(tiny_qwen2_bundle)
    assert manifest.shape is not None
    assert manifest.shape.hidden_size == config["hidden_size"] == manifest.dim
    assert manifest.shape.num_layers == config["num_hidden_layers"]
    assert manifest.shape.num_heads == config["num_attention_heads"]
    assert manifest.shape.num_kv_heads == config["num_key_value_heads"]
    assert manifest.shape.intermediate_size == config["intermediate_size"]
    # the default qwen2 graph computes attention and the MLP in blocks (bounded memory at 32k)
    assert manifest.graph.attention_query_chunk is not None
    assert manifest.graph.mlp_chunk is not None
