"""Vector post-processing (normalize, dimensions) and the packed wire encodings.

Why here and pure numpy: both front ends return the same numbers (the HTTP facade's base64 is the
float32 packing below), and the byte layouts are a public contract that clients decode, so they
are defined in one place next to their inverse (``decode``), which the tests use.

Layouts (all little-endian, one vector per ``bytes``):

* ``float32`` / ``float16``: IEEE values, 4 / 2 bytes per dimension.
* ``int8``: ``clip(round(v * 127), -127, 127)`` of the L2-normalised vector, one signed byte per
  dimension; decode with ``q / 127``. Needs ``normalize=true`` (unnormalised values overflow).
* ``binary``: one bit per dimension, 1 when ``v > 0``; dimension ``i`` is bit ``7 - i % 8`` of byte
  ``i // 8`` (most significant bit first, ``numpy.packbits`` order); trailing bits are 0.
"""

from __future__ import annotations

import numpy as np

from service.domain import Encoding, FloatArray
from service.errors import DimensionsNotAllowed, InvalidInput

INT8_SCALE = 127.0
_EPS = 1e-12


def check_dimensions(dimensions: int | None, *, model_dims: int, allowed: bool) -> None:
    """Refuse ``dimensions`` unless the operator allowed it; asking for the full size is a no-op."""
    if dimensions is None or dimensions == model_dims:
        return
    if not allowed:
        raise DimensionsNotAllowed(
            f"dimensions={dimensions} is not enabled for this model (it is not trained for truncated "
            f"vectors); omit it to get all {model_dims} dimensions",
            field="dimensions",
        )
    if not 1 <= dimensions <= model_dims:
        raise DimensionsNotAllowed(f"dimensions must be between 1 and {model_dims}", field="dimensions")


def check_encoding(encoding: Encoding, *, normalize: bool) -> None:
    if encoding == "int8" and not normalize:
        raise InvalidInput(
            "encoding int8 is defined on normalised vectors; use normalize=true", field="encoding"
        )


def postprocess(
    normalized: FloatArray, norms: FloatArray, *, normalize: bool, dimensions: int | None
) -> FloatArray:
    """From the graph's outputs (unit vectors + their pre-normalisation norms) to what was asked.

    ``normalize=false`` returns the pooled vector (unit vector × norm). ``dimensions`` keeps the
    first ``d`` components and, when normalising, renormalises them (Matryoshka convention).
    """
    vectors = normalized if normalize else normalized * norms.reshape(-1, 1)
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
        if normalize:
            lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(lengths, _EPS)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def pack(vectors: FloatArray, encoding: Encoding) -> list[bytes]:
    """One ``bytes`` per row in the layout named by ``encoding`` (not ``values``)."""
    if encoding == "float32":
        rows = vectors.astype("<f4")
    elif encoding == "float16":
        rows = vectors.astype("<f2")
    elif encoding == "int8":
        rows = np.clip(np.rint(vectors * INT8_SCALE), -127, 127).astype(np.int8)
    elif encoding == "binary":
        rows = np.packbits(vectors > 0, axis=1, bitorder="big")
    else:
        raise ValueError(f"{encoding!r} is not a packed encoding")
    return [row.tobytes() for row in rows]


def decode(data: bytes, encoding: Encoding, dims: int) -> FloatArray:
    """Inverse of :func:`pack` for one vector (binary decodes to 0/1 per dimension)."""
    if encoding == "float32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if encoding == "float16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if encoding == "int8":
        return np.frombuffer(data, dtype=np.int8).astype(np.float32) / INT8_SCALE
    if encoding == "binary":
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="big")[:dims]
        return bits.astype(np.float32)
    raise ValueError(f"{encoding!r} is not a packed encoding")


def packed_size(encoding: Encoding, dims: int) -> int:
    """Bytes per vector on the wire (values: 4 per float), for response size planning."""
    return {"values": 4 * dims, "float32": 4 * dims, "float16": 2 * dims, "int8": dims}.get(
        encoding, (dims + 7) // 8
    )
