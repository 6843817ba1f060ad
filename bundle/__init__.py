"""The model bundle contract shared by ``export`` (writer) and ``service`` (reader).

A bundle is a directory: ``model.onnx`` (+ external data), ``tokenizer.json`` and
``manifest.json``. Nothing else passes between the two halves of the project, so every fact the
service needs to serve correctly (pooling, EOS policy, prompts, dims, limits, hashes, golden
vectors) is written down here, once.
"""

from bundle.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleError,
    GoldenVector,
    GraphSpec,
    Manifest,
    ModelShape,
    PromptSpec,
    Source,
    TokenizerSpec,
    file_sha256,
    load_manifest,
    verify_files,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "BundleError",
    "GoldenVector",
    "GraphSpec",
    "Manifest",
    "ModelShape",
    "PromptSpec",
    "Source",
    "TokenizerSpec",
    "file_sha256",
    "load_manifest",
    "verify_files",
]
