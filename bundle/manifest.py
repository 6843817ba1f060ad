"""``manifest.json``: the schema, how it is read, and how a bundle's files are verified.

Why a typed schema rather than a dict: the service refuses to start on a bundle it does not
understand (unknown format version, a missing field, a file whose hash differs), and the error
must name the field or file. Pydantic gives exactly that with ``extra="forbid"``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

Family = Literal["qwen2", "bert"]
Pooling = Literal["last_token", "mean", "cls"]
Precision = Literal["fp32", "fp16", "int8"]
InputType = Literal["query", "document"]

# The cosine to the reference a vector must reach, by the weakest precision in play: export
# validation gates a bundle with it (export/validate.py) and the served self-test holds the golden
# vectors to it (service/selftest.py), so a bundle that passed export passes start-up on the same
# precision. bf16 is not a bundle precision but TensorRT may compute in it. fp32 leaves room for
# TF32 / kernel-order differences.
COSINE_BOUND: dict[str, float] = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995, "int8": 0.99}
# --- graph variants (export/passes, export/ort_fusion): which rewrite of the exported graph a
# bundle carries. Kept apart from the shared definitions above so parallel edits merge cleanly.
# plain: the exporter's graph; fused / chunked: opset-23 Attention (+ query-chunked attention and
# MLP); ort-fused: BERT attention as ONNX Runtime's com.microsoft.Attention, or in int8 bundles
# com.microsoft.MultiHeadAttention after quantised projections (ORT-only contrib ops);
# ort-chunked: chunked with qwen2 attention as com.microsoft.MultiHeadAttention (ORT's flash path).
GraphVariant = Literal["plain", "fused", "chunked", "ort-fused", "ort-chunked"]
GRAPH_VARIANTS: tuple[GraphVariant, ...] = ("plain", "fused", "chunked", "ort-fused", "ort-chunked")


class BundleError(Exception):
    """A bundle cannot be used: missing, malformed, tampered or inconsistent. Says which file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where the weights came from, so a bundle can be traced back and reproduced."""

    kind: Literal["hub", "folder", "builtin"]
    id: str = Field(description="hub id, folder path or builtin asset name")
    revision: str | None = Field(default=None, description="hub revision (commit) when known")
    content_sha256: str | None = Field(
        default=None, description="hash over the source folder's files (folder / builtin sources)"
    )


class GraphSpec(_Strict):
    """The ONNX graph contract. Inputs are int64 ``[batch, seq]``; outputs float32."""

    file: str = "model.onnx"
    external_data: list[str] = Field(default_factory=list, description="external weight files")
    inputs: list[str] = Field(default_factory=lambda: ["input_ids", "attention_mask"])
    # outputs[0]: L2-normalised pooled embedding [batch, dim];
    # outputs[1]: the pooled vector's L2 norm before normalisation [batch] — lets the service
    # return unnormalised vectors without shipping a second graph.
    outputs: list[str] = Field(default_factory=lambda: ["sentence_embedding", "embedding_norm"])
    opset: int
    # Number of queries per attention block when the graph computes attention in query chunks
    # (bounded memory at long lengths); None when attention is computed in one piece.
    attention_query_chunk: int | None = None
    # Tokens per block when the MLP is computed in sequence blocks; None when in one piece.
    mlp_chunk: int | None = None
    # Which rewrite of the exported graph this is (see GraphVariant); None in bundles written
    # before the field existed.
    variant: GraphVariant | None = None


class ModelShape(_Strict):
    """Transformer sizes, so the server can predict a batch's compute and activation memory."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


class TokenizerSpec(_Strict):
    """How text becomes ids. The service applies this policy; it never guesses it.

    The content ids of a text are ``tokenizer.json`` applied with ``add_special_tokens=False`` and
    special-token parsing disabled (so user text cannot inject an EOS). The model input is
    ``prefix_ids + content + suffix_ids``; truncation only ever removes content ids.
    """

    file: str = "tokenizer.json"
    prefix_ids: list[int] = Field(description="ids placed before the content (BERT: [CLS])")
    suffix_ids: list[int] = Field(description="ids placed after the content (gte-Qwen2: <|endoftext|>)")
    pad_id: int
    eos_token: str | None = None
    eos_id: int | None = None
    vocab_size: int
    lowercase: bool = False


class PromptSpec(_Strict):
    """Instruction policy: queries get ``query_template``; documents get the text unchanged."""

    query_template: str | None = Field(
        default=None,
        description="e.g. 'Instruct: {task}\\nQuery: {text}'; None when the model takes no instruction",
    )
    tasks: dict[str, str] = Field(default_factory=dict, description="named task → instruction text")
    default_task: str | None = None


class GoldenVector(_Strict):
    """A fixed input and what the validated graph returned for it: the start-up self-test."""

    text: str
    input_type: InputType = "document"
    task: str | None = None
    token_ids: list[int]
    embedding: list[float]


class Manifest(_Strict):
    format_version: int
    model_id: str
    source: Source
    family: Family
    model_type: str
    pooling: Pooling
    attention: Literal["bidirectional"] = "bidirectional"
    normalized: bool = True
    dim: int
    max_input_tokens: int
    precision: Precision
    batch_invariant: bool = Field(
        default=True, description="False when a text's vector depends on its batch neighbours"
    )
    matryoshka: bool = Field(default=False, description="trained for truncated dimensions")
    graph: GraphSpec
    shape: ModelShape | None = None
    tokenizer: TokenizerSpec
    prompts: PromptSpec
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(description="relative path → sha256 of every bundle file")
    validation: dict[str, float | int | str | bool] = Field(default_factory=dict)
    golden: list[GoldenVector] = Field(default_factory=list)
    created_at: str

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n")
        return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _inside(directory: Path, relative: str) -> Path:
    """Resolve a manifest path and refuse anything that escapes the bundle directory."""
    root = directory.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise BundleError(f"{MANIFEST_NAME}: path {relative!r} escapes the bundle directory")
    return candidate


def load_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist")
    if not path.is_file():
        raise BundleError(f"{path}: no {MANIFEST_NAME}; is {directory} an exported bundle?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc
    for rel in [manifest.graph.file, manifest.tokenizer.file, *manifest.graph.external_data]:
        _inside(directory, rel)
        if rel not in manifest.files:
            raise BundleError(f"{path}: {rel} is used but has no sha256 in 'files'")
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check every file's sha256 against the manifest; the message names the first bad file."""
    for rel, expected in sorted(manifest.files.items()):
        target = _inside(directory, rel)
        if not target.is_file():
            raise BundleError(f"bundle file {rel} is missing from {directory}")
        actual = file_sha256(target)
        if actual != expected:
            raise BundleError(
                f"bundle file {rel} does not match the manifest (sha256 {actual[:12]}…, "
                f"expected {expected[:12]}…): tampered, truncated or swapped"
            )
