"""A toy bundle (word-level tokenizer + mean-of-embeddings ONNX graph) and instrumented runtimes.

Why our own and not ``tests/service/svc_toy.py``: that module belongs to the service tests and
may change under us; these tests need a few extra knobs (a second tokenizer with a permuted
vocabulary for the swap test, a runtime that records every batch it computed). Built in
milliseconds, loaded by the real ``OrtRuntime`` or replaced by :class:`CountingRuntime`.

One word is one token (``Whitespace`` pre-tokenizer, unknown words → ``[UNK]``), so a text's
token count is easy to control: ``n`` words → ``n + 2`` model tokens ([CLS] … [SEP]).
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from bundle.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    GoldenVector,
    GraphSpec,
    Manifest,
    PromptSpec,
    Source,
    TokenizerSpec,
    file_sha256,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
PAD, UNK, CLS, SEP = range(4)
# Words w0 … w499 plus the template's words: enough distinct tokens to tag every request.
TEMPLATE_WORDS = "instruct query find documents about the cat : . ,"
WORDS = [f"w{i}" for i in range(500)] + TEMPLATE_WORDS.split()
DIM = 16
MAX_TOKENS = 32
TEMPLATE = "Instruct: {task}\nQuery: {text}"
TASKS = {"search": "find documents about the query"}


def toy_tokenizer(permute: bool = False) -> Tokenizer:
    """``permute=True``: same words, different ids — a tokenizer that does not match the bundle."""
    words = list(reversed(WORDS)) if permute else WORDS
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return tok


VOCAB = len(SPECIALS) + len(WORDS)


def embedding_table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((VOCAB, DIM)).astype(np.float32)


def reference(table: np.ndarray, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the token embeddings (float64), then L2-normalise: (unit vectors, norms)."""
    pooled = np.stack([table[list(s)].astype(np.float64).mean(axis=0) for s in seqs])
    norms = np.linalg.norm(pooled, axis=1)
    return pooled / norms[:, None], norms


def _graph(table: np.ndarray, positions: int | None = None) -> onnx.ModelProto:
    """``positions``: add a BERT-like learned position table of that many rows (all zeros, so the
    vectors do not change) gathered by ``Range(seq)``: longer inputs fail in ONNX Runtime."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["emb_pos" if positions else "emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis_seq"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("ReduceL2", ["pooled", "axis_last"], ["norm2"], keepdims=1),
        helper.make_node("Div", ["pooled", "norm2"], ["sentence_embedding"]),
        helper.make_node("Squeeze", ["norm2", "axis_last"], ["embedding_norm"]),
    ]
    extra = []
    if positions:
        nodes[1:1] = [  # topological order: before the Mul that reads emb_pos
            helper.make_node("Shape", ["input_ids"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["seq"]),
            helper.make_node("Range", ["zero", "seq", "one"], ["pos_ids"]),
            helper.make_node("Gather", ["pos_table", "pos_ids"], ["pos_emb"]),
            helper.make_node("Add", ["emb", "pos_emb"], ["emb_pos"]),
        ]
        extra = [
            numpy_helper.from_array(np.zeros((positions, table.shape[1]), np.float32), "pos_table"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", DIM]),
            helper.make_tensor_value_info("embedding_norm", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_seq"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
            *extra,
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def content_ids(tok: Tokenizer, text: str) -> list[int]:
    """Independent of service.tokenizer: the raw library call, special tokens not parsed."""
    tok.encode_special_tokens = True
    return list(tok.encode(text, add_special_tokens=False).ids)


def build_toy_bundle(out: Path, *, max_input_tokens: int = MAX_TOKENS, positions: int | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = toy_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    table = embedding_table()
    onnx.save(_graph(table, positions), str(out / "model.onnx"))
    goldens = []
    for text, kind, task in [("w1 w2 w3", "document", None), ("w7 cat", "query", "search")]:
        rendered = TEMPLATE.format(task=TASKS[task], text=text) if task else text
        ids = [CLS, *content_ids(tok, rendered), SEP]
        vec, _ = reference(table, [ids])
        goldens.append(
            GoldenVector(text=text, input_type=kind, task=task, token_ids=ids, embedding=vec[0].tolist())
        )
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_id="toy-mean",
        source=Source(kind="builtin", id="toy"),
        family="bert",
        model_type="toy",
        pooling="mean",
        dim=DIM,
        max_input_tokens=max_input_tokens,
        precision="fp32",
        graph=GraphSpec(opset=18),
        tokenizer=TokenizerSpec(
            prefix_ids=[CLS], suffix_ids=[SEP], pad_id=PAD, vocab_size=VOCAB, lowercase=True
        ),
        prompts=PromptSpec(query_template=TEMPLATE, tasks=TASKS, default_task=None),
        files={name: file_sha256(out / name) for name in ("model.onnx", "tokenizer.json")},
        validation={"passed": True},
        golden=goldens,
        created_at=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc).isoformat(),
    )
    manifest.write(out)
    return out


def rehash(bundle: Path, *names: str) -> None:
    """Recompute the manifest's sha256 of ``names`` (an attacker or a careless copy did so too)."""
    path = bundle / MANIFEST_NAME
    raw = json.loads(path.read_text())
    for name in names:
        raw["files"][name] = file_sha256(bundle / name)
    path.write_text(json.dumps(raw, indent=1))


def edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    path = bundle / MANIFEST_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw, indent=1))


class CountingRuntime:
    """The toy model in numpy, recording every batch it computed (rows as id lists).

    ``delay_s`` makes each call slow (a fixed capacity); ``gate`` (when set) holds every call
    until released; ``fail`` decides per batch whether the call raises.
    """

    def __init__(
        self,
        table: np.ndarray | None = None,
        *,
        delay_s: float = 0.0,
        fail: Callable[[list[list[int]]], bool] | None = None,
    ) -> None:
        self.table = embedding_table() if table is None else table
        self.delay_s = delay_s
        self.fail = fail
        self.lock = threading.Lock()
        self.batches: list[tuple[list[list[int]], bool]] = []  # (rows, failed)
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def reset(self) -> None:
        """Forget warm-up and self-test calls (start-up runs the golden texts)."""
        with self.lock:
            self.batches.clear()
        self.entered.clear()

    def hold(self) -> None:
        """From now on every call waits for ``gate`` (set it to release them)."""
        self.reset()
        self.gate = threading.Event()

    @property
    def providers(self) -> tuple[str, ...]:
        return ("CountingFakeProvider",)

    @property
    def calls(self) -> int:
        with self.lock:
            return len(self.batches)

    def rows(self) -> list[list[int]]:
        with self.lock:
            return [row for rows, _ in self.batches for row in rows]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        rows = [
            [int(x) for x in row[mask.astype(bool)]]
            for row, mask in zip(input_ids, attention_mask, strict=True)
        ]
        failed = self.fail is not None and self.fail(rows)
        with self.lock:
            self.batches.append((rows, failed))
        if failed:
            raise RuntimeError("injected runtime failure (secret-internal-detail)")
        vectors, norms = reference(self.table, rows)
        return vectors.astype(np.float32), norms.astype(np.float32)


def word_id(word: str) -> int:
    return len(SPECIALS) + WORDS.index(word)
