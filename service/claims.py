"""Start-up checks of the manifest's claims against the graph and the tokenizer.

Why: the manifest is what GetModelInfo reports and what the service sizes its limits by, but it
is a text file anyone can edit (hashes cover the *other* files). A ``dim`` the graph does not
produce makes the server contradict itself; a ``max_input_tokens`` past the graph's position
table or a ``vocab_size`` past its embedding rows turns ordinary requests into ONNX Runtime
errors (500s). Every claim that can be checked is checked here, and a bundle that disagrees is
refused with the field named. Checked (see docs/reliability.md, "Manifest claims"):

* ``tokenizer.vocab_size`` vs the tokenizer: its largest id, and the prefix/suffix/pad/eos ids,
  must be below it (token-id inputs are validated against ``vocab_size`` at run time).
* ``tokenizer.vocab_size`` vs the graph: the rows of the table ``input_ids`` is gathered from,
  read from the ONNX file (:mod:`service.onnx_shapes`); when the reader finds no table, a probe
  run with the largest id instead (on every provider that bounds-checks ``Gather``).
* ``dim``: the width of what the graph returns for the probe.
* ``max_input_tokens`` (the served limit, after ``--max-input-tokens``): one probe input of that
  many tokens, for families with a learned position table (BERT: ``position_embeddings`` rows).
  RoPE families (Qwen2) have no table: any length runs, so the limit is the checkpoint's
  ``max_position_embeddings`` as recorded in the manifest at export and cannot be checked here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bundle.manifest import Manifest
from service.domain import FloatArray
from service.errors import StartupError
from service.onnx_shapes import OnnxFormatError, read_graph_facts
from service.runtime import IntArray, Runtime
from service.tokenizer import TextTokenizer

log = logging.getLogger("service.claims")

# Families whose graph holds a learned position table, so a length past it cannot run.
ABSOLUTE_POSITIONS = {"bert": True, "qwen2": False}
_FIX = "re-export the bundle, or correct manifest.json and restore its original hash-checked files"


def check_tokenizer(manifest: Manifest, tokenizer: TextTokenizer) -> None:
    """Every id the tokenizer or the manifest's policy can emit is below ``vocab_size``."""
    spec = manifest.tokenizer
    largest = tokenizer.largest_id
    if largest >= spec.vocab_size:
        raise StartupError(
            f"manifest.json tokenizer.vocab_size={spec.vocab_size} disagrees with {spec.file}, "
            f"whose largest token id is {largest}; {_FIX}"
        )
    named = {"prefix_ids": spec.prefix_ids, "suffix_ids": spec.suffix_ids, "pad_id": [spec.pad_id]}
    if spec.eos_id is not None:
        named["eos_id"] = [spec.eos_id]
    for name, ids in named.items():
        bad = [i for i in ids if not 0 <= i < spec.vocab_size]
        if bad:
            raise StartupError(
                f"manifest.json tokenizer.{name} holds id {bad[0]}, outside tokenizer.vocab_size="
                f"{spec.vocab_size}; {_FIX}"
            )


def check_graph_file(manifest: Manifest, directory: Path) -> bool:
    """The embedding table read from the ONNX file has a row for every id below ``vocab_size``.

    Returns whether the table was found (if not, :func:`probe` checks the claim by running it).
    """
    path = directory / manifest.graph.file
    try:
        rows = read_graph_facts(path).embedding_rows(manifest.graph.inputs[0])
    except (OnnxFormatError, OSError, ValueError) as exc:
        # ONNX Runtime already accepted the file; the probe run below still checks the claim.
        log.warning(
            "could not read the embedding table's shape from %s (%s); relying on the probe", path, exc
        )
        return False
    if rows is None:
        log.info("no Gather of input_ids in %s; the vocabulary is checked by the probe run only", path)
        return False
    vocab = manifest.tokenizer.vocab_size
    if rows < vocab:
        raise StartupError(
            f"manifest.json tokenizer.vocab_size={vocab} is more than the {rows} rows of the embedding "
            f"table in {manifest.graph.file}; ids {rows}..{vocab - 1} would fail in the graph. {_FIX}"
        )
    return True


def _run(runtime: Runtime, ids: IntArray) -> FloatArray:
    vectors, _ = runtime.run(ids, np.ones_like(ids))
    return vectors


def probe(manifest: Manifest, runtime: Runtime, max_input_tokens: int, *, vocab_checked: bool) -> None:
    """A plain run (width = ``dim``), the highest id unless :func:`check_graph_file` already
    checked the table, then (learned positions) the longest input.

    The plain run comes first so that a runtime that cannot run at all is reported as such,
    not blamed on a claim.
    """
    spec, graph = manifest.tokenizer, manifest.graph.file
    head, tail = spec.prefix_ids[:1], spec.suffix_ids[:1]
    word = 1 if spec.pad_id != 1 else 2
    plain: IntArray = np.asarray([[*head, word, *tail]], dtype=np.int64)
    try:
        vectors = _run(runtime, plain)
    except Exception as exc:
        raise StartupError(
            f"the first run of {graph} failed ({type(exc).__name__}: {exc}); check the provider "
            "settings and the device, or re-export the bundle"
        ) from exc
    width = int(vectors.shape[-1]) if vectors.ndim == 2 else -1
    if width != manifest.dim:
        raise StartupError(
            f"manifest.json dim={manifest.dim}, but {graph} returns vectors of shape "
            f"{tuple(vectors.shape)}; {_FIX}"
        )
    top = spec.vocab_size - 1
    try:
        if not vocab_checked:
            _run(runtime, np.asarray([[*head, top, *tail]], dtype=np.int64))
    except Exception as exc:  # ORT's own error types; the claim is what is wrong
        raise StartupError(
            f"manifest.json tokenizer.vocab_size={spec.vocab_size}: {graph} cannot embed "
            f"token id {top} ({exc}); {_FIX}"
        ) from exc
    if not ABSOLUTE_POSITIONS.get(manifest.family, True):
        return
    long: IntArray = np.full((1, max_input_tokens), spec.pad_id, dtype=np.int64)
    long[0, 0] = word
    try:
        _run(runtime, long)
    except Exception as exc:
        raise StartupError(
            f"manifest.json max_input_tokens={manifest.max_input_tokens}: {graph} cannot "
            f"take an input of {max_input_tokens} tokens ({exc}); its position table is shorter. "
            f"Set --max-input-tokens (EMBED_MAX_INPUT_TOKENS) to the graph's limit, or {_FIX}"
        ) from exc
