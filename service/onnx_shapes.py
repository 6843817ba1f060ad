"""The few facts the server reads from an ONNX file itself, without the ``onnx`` package.

Why not ``import onnx``: it is an export-only dependency (the serving image does not carry it),
and ONNX Runtime exposes no initializer shapes. What the start-up checks need is small: the row
count of the embedding table the graph gathers ``input_ids`` from. The ONNX file is a protobuf
(``ModelProto``), so a reader of the wire format that walks ``graph.node`` and
``graph.initializer`` and *skips* every weight payload answers that in milliseconds, even for a
graph whose weights are inline (the file is memory-mapped; payloads are never copied).

Field numbers (onnx.proto, stable since IR v3): ModelProto.graph = 7; GraphProto.node = 1,
initializer = 5; NodeProto.input = 1, op_type = 4; TensorProto.dims = 1, name = 8.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Ops that only convert a weight (quantised or fp16 tables) without changing its row count.
_PASS_THROUGH = frozenset({"DequantizeLinear", "Cast", "Identity"})


class OnnxFormatError(ValueError):
    """The file is not a protobuf ``ModelProto`` this reader understands."""


Buffer = bytes | mmap.mmap
Span = tuple[int, int]  # [start, end) of a length-delimited field inside the file


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise OnnxFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxFormatError("varint too long")


def _fields(buf: Buffer, span: Span) -> Iterator[tuple[int, int, int | Span]]:
    """(field number, wire type, value): ints for varints, spans for length-delimited fields."""
    pos, end = span
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise OnnxFormatError("length-delimited field runs past the end")
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:
            raise OnnxFormatError(f"unsupported wire type {wire}")


def _text(buf: Buffer, value: int | Span) -> str:
    return buf[value[0] : value[1]].decode("utf-8", "replace") if isinstance(value, tuple) else ""


def _dims(buf: Buffer, value: int | Span) -> list[int]:
    if isinstance(value, int):
        return [value]
    out, (pos, end) = [], value  # packed repeated int64
    while pos < end:
        item, pos = _varint(buf, pos, end)
        out.append(item)
    return out


@dataclass
class GraphFacts:
    """Initializer shapes by name and the (op_type, inputs) of every node, in graph order."""

    initializers: dict[str, list[int]] = field(default_factory=dict)
    nodes: list[tuple[str, list[str], list[str]]] = field(default_factory=list)

    def embedding_rows(self, input_name: str = "input_ids") -> int | None:
        """Rows of the table the graph gathers ``input_name`` from; None when not found."""
        producers = {out: (op, inputs) for op, inputs, outputs in self.nodes for out in outputs}
        for op, inputs, _ in self.nodes:
            if op == "Gather" and len(inputs) >= 2 and inputs[1] == input_name:
                table = inputs[0]
            elif op == "EmbedLayerNormalization" and len(inputs) >= 3 and inputs[0] == input_name:
                table = inputs[2]  # ORT's fused BERT embedding: (ids, segment ids, word table, …)
            else:
                continue
            for _ in range(8):  # follow DequantizeLinear / Cast back to the stored weight
                if table in self.initializers:
                    shape = self.initializers[table]
                    return shape[0] if shape else None
                step = producers.get(table)
                if step is None or step[0] not in _PASS_THROUGH or not step[1]:
                    break
                table = step[1][0]
        return None


def read_graph_facts(path: Path) -> GraphFacts:
    """Parse ``path`` (a ``.onnx`` file) far enough to list initializer shapes and nodes."""
    facts = GraphFacts()
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for number, wire, value in _fields(buf, (0, len(buf))):
            if number == 7 and wire == _LEN and isinstance(value, tuple):
                _read_graph(buf, value, facts)
    return facts


def _read_graph(buf: Buffer, graph: Span, facts: GraphFacts) -> None:
    for number, wire, value in _fields(buf, graph):
        if wire != _LEN or not isinstance(value, tuple):
            continue
        if number == 1:
            op, inputs, outputs = "", [], []
            for n, _, v in _fields(buf, value):
                if n == 1:
                    inputs.append(_text(buf, v))
                elif n == 2:
                    outputs.append(_text(buf, v))
                elif n == 4:
                    op = _text(buf, v)
            facts.nodes.append((op, inputs, outputs))
        elif number == 5:
            name, dims = "", []
            for n, _, v in _fields(buf, value):
                if n == 1:
                    dims.extend(_dims(buf, v))
                elif n == 8:
                    name = _text(buf, v)
            facts.initializers[name] = dims
