"""A toy bundle built in milliseconds: word-level tokenizer + mean-of-embeddings ONNX graph.

Why: the service's behaviour (batching, errors, encodings, truncation, health) does not depend
on a transformer, and these tests must run before (and much faster than) the real exports. The
graph follows the real contract — ``(input_ids, attention_mask) → (sentence_embedding,
embedding_norm)`` — and :func:`reference` is its independent numpy twin.
"""

from __future__ import annotations

import datetime
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
    GoldenVector,
    GraphSpec,
    Manifest,
    PromptSpec,
    Source,
    TokenizerSpec,
    file_sha256,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]
PAD, UNK, CLS, SEP, EOS = range(5)
_WORD_LIST = (
    "instruct query find documents about the a an of and to in is it cat cats dog dogs fish bird "
    "red green blue one two three four five six seven eight nine ten hello world quick brown fox "
    "jumps over lazy weather today rain sun snow paris london tokyo city river mountain : , . ? ! - "
    "< > eos"
)
WORDS = _WORD_LIST.split()
DIM = 16
MAX_TOKENS = 32
TEMPLATE = "Instruct: {task}\nQuery: {text}"
TASKS = {"search": "find documents about the query", "animals": "find the cat"}


def toy_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return tok


def embedding_table(vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((vocab_size, DIM)).astype(np.float32)


def reference(table: np.ndarray, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the token embeddings, then L2 normalise: (unit vectors, norms)."""
    pooled = np.stack([table[list(s)].astype(np.float64).mean(axis=0) for s in seqs])
    norms = np.linalg.norm(pooled, axis=1)
    return pooled / norms[:, None], norms


def _graph(table: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis_seq"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("ReduceL2", ["pooled", "axis_last"], ["norm2"], keepdims=1),
        helper.make_node("Div", ["pooled", "norm2"], ["sentence_embedding"]),
        helper.make_node("Squeeze", ["norm2", "axis_last"], ["embedding_norm"]),
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
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def content_ids(tok: Tokenizer, text: str) -> list[int]:
    """Independent of service.tokenizer: raw tokenizers call, specials not parsed."""
    tok.encode_special_tokens = True
    return list(tok.encode(text, add_special_tokens=False).ids)


def build_toy_bundle(
    out: Path,
    *,
    golden: bool = True,
    batch_invariant: bool = True,
    max_input_tokens: int = MAX_TOKENS,
    template: str | None = TEMPLATE,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = toy_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    table = embedding_table(tok.get_vocab_size())
    onnx.save(_graph(table), str(out / "model.onnx"))
    goldens = []
    if golden:
        samples = [("hello world", "document", None), ("red fish", "query", "search")]
        for text, kind, task in samples:
            rendered = TEMPLATE.format(task=TASKS[task], text=text) if task and template else text
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
        batch_invariant=batch_invariant,
        graph=GraphSpec(opset=18),
        tokenizer=TokenizerSpec(
            prefix_ids=[CLS], suffix_ids=[SEP], pad_id=PAD, vocab_size=tok.get_vocab_size(), lowercase=True
        ),
        prompts=PromptSpec(query_template=template, tasks=TASKS if template else {}, default_task=None),
        files={name: file_sha256(out / name) for name in ("model.onnx", "tokenizer.json")},
        validation={"max_abs_diff": 1e-7, "passed": True},
        golden=goldens,
        created_at=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC).isoformat(),
    )
    manifest.write(out)
    return out


class FakeRuntime:
    """Computes the toy reference in numpy; can be slow, fail, or block, and counts its calls."""

    def __init__(
        self,
        table: np.ndarray,
        *,
        delay_s: float = 0.0,
        fail: Callable[[np.ndarray], bool] | None = None,
    ) -> None:
        self.table = table
        self.delay_s = delay_s
        self.fail = fail
        self.calls: list[tuple[int, int]] = []  # (batch, padded length) per call
        self.rows_seen: list[list[int]] = []
        self.lengths: list[list[int]] = []  # real lengths of the rows of each call
        self.gate: threading.Event | None = None  # when set, run() waits for it
        self.started = threading.Event()

    @property
    def providers(self) -> tuple[str, ...]:
        return ("FakeExecutionProvider",)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(input_ids.shape)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        seqs = [
            [int(i) for i in row[mask.astype(bool)]]
            for row, mask in zip(input_ids, attention_mask, strict=True)
        ]
        self.rows_seen.extend(seqs)
        self.lengths.append([len(s) for s in seqs])
        if self.fail is not None and self.fail(input_ids):
            raise RuntimeError("fake runtime exploded (secret detail)")
        vectors, norms = reference(self.table, seqs)
        return vectors.astype(np.float32), norms.astype(np.float32)
