"""Tokenisation is not a shared bottleneck before admission (issue 12 item 7).

Before: two requests of 256 × 21k-token texts each took 8–23 s to tokenise and *then* got 413,
and a one-word Embed waited up to 8 s behind them (two shared tokeniser threads). Now an input
far past the limit is refused from a prefix (never the whole text), and small jobs have a lane of
their own. The tokenizer is wrapped in a spy that records what it was asked to encode and can
hold big batches on a gate, so nothing here depends on speed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from rel_harness import live_server
from rel_toy import MAX_TOKENS

from service.core import EmbeddingCore
from service.domain import EmbedJob
from service.errors import InputTooLong
from service.tokenize_lanes import INLINE_CHARS, SMALL_JOB_CHARS, chunks
from service.tokenizer import PRECHECK_CHARS_PER_TOKEN, TextTokenizer

GUARD_S = 30.0


class SpyTokenizer:
    """Delegates to the real tokenizer; records encoded characters; holds big batches on a gate."""

    def __init__(
        self, real: Any, hold_above_chars: int | None = None, hold_first_of: Sequence[str] = ()
    ) -> None:
        self._real = real
        self.encoded_chars = 0
        self.lock = threading.Lock()
        self.hold_above = hold_above_chars
        self.hold_first_of = set(hold_first_of)  # hold the first call whose first text starts so
        self.gate = threading.Event()
        self.held = 0
        self.calls: list[str] = []  # first word of each call's first text, in call order
        self.threads: list[threading.Thread] = []  # the thread of each call, in call order

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool) -> Any:
        size = sum(len(t) for t in texts)
        tag = texts[0].split(" ", 1)[0] if texts else ""
        with self.lock:
            self.encoded_chars += size
            self.calls.append(tag)
            self.threads.append(threading.current_thread())
            first = tag in self.hold_first_of
            self.hold_first_of.discard(tag)
        if first or (self.hold_above is not None and size > self.hold_above):
            with self.lock:
                self.held += 1
            self.gate.wait(GUARD_S)
        return self._real.encode_batch(texts, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def spy_on(core: EmbeddingCore, **kwargs: Any) -> SpyTokenizer:
    model = core._model
    assert model is not None
    tokenizer: TextTokenizer = model.tokenizer
    spy = SpyTokenizer(tokenizer._tok, **kwargs)
    tokenizer._tok = spy  # type: ignore[assignment]
    return spy


@pytest.mark.asyncio
async def test_over_limit_inputs_are_refused_without_tokenising_them_whole(rel_toy_bundle: Path) -> None:
    huge = " ".join(f"w{100 + i % 400}" for i in range(20_000))  # 20k tokens, 5 characters each
    async with live_server(rel_toy_bundle) as live:
        spy = spy_on(live.core)
        with pytest.raises(InputTooLong) as err:
            await live.core.embed(EmbedJob(texts=(huge,) * 64, truncation="none"))
        assert err.value.field == "inputs[0]" and f"limit of {MAX_TOKENS}" in err.value.message
        sent = 64 * len(huge)
        assert spy.encoded_chars < sent // 100, (spy.encoded_chars, sent)
        # Under the limit is still admitted (the prefix check only refuses a count above it) …
        fits = " ".join(["w1"] * (MAX_TOKENS - 2))
        padded = ("w1" + " " * 40) * (MAX_TOKENS - 2)  # long in characters, short in tokens
        assert len(padded) > PRECHECK_CHARS_PER_TOKEN * MAX_TOKENS  # takes the prefix check
        result = await live.core.embed(EmbedJob(texts=(fits, padded), truncation="none"))
        assert [t.token_count for t in result.inputs] == [MAX_TOKENS, MAX_TOKENS]
        # … and one token past it is refused exactly as before, on the exact path.
        with pytest.raises(InputTooLong, match=f"has {MAX_TOKENS + 1} tokens"):
            await live.core.embed(EmbedJob(texts=(fits + " w2",), truncation="none"))
        # A request tokenised in chunks names the input by its index in the request.
        texts = [padded + " " * 8000] * 40
        texts[27] = huge
        with pytest.raises(InputTooLong) as err:
            await live.core.embed(EmbedJob(texts=tuple(texts), truncation="none"))
        assert err.value.field == "inputs[27]", err.value.message
        assert len(chunks(tuple(texts))) > 3


@pytest.mark.asyncio
async def test_a_query_is_tokenised_on_the_loop_and_a_bigger_job_in_a_lane(rel_toy_bundle: Path) -> None:
    """A query costs less to tokenise than the hop to a thread and back; a bigger job still hops."""
    async with live_server(rel_toy_bundle) as live:
        spy = spy_on(live.core)
        await live.core.embed(EmbedJob(texts=("w1 w2 w3",)))
        bigger = " ".join(["w4"] * (INLINE_CHARS // 2))
        assert len(bigger) > INLINE_CHARS
        await live.core.embed(EmbedJob(texts=(bigger,), truncation="end"))
        assert spy.calls == ["w1", "w4"]
        assert spy.threads[0] is threading.current_thread()  # the event loop's thread
        assert spy.threads[1] is not threading.current_thread()


@pytest.mark.asyncio
async def test_small_request_does_not_wait_behind_huge_tokenisation(rel_toy_bundle: Path) -> None:
    huge = " ".join(["w3"] * (SMALL_JOB_CHARS // 2))
    async with live_server(rel_toy_bundle) as live:
        spy = spy_on(live.core, hold_above_chars=SMALL_JOB_CHARS)
        big = [
            asyncio.ensure_future(live.core.embed(EmbedJob(texts=(huge,) * 4, truncation="end")))
            for _ in range(3)
        ]
        loop = asyncio.get_running_loop()
        end = loop.time() + GUARD_S
        while spy.held < 2:  # both big-job threads are busy (held) now
            assert loop.time() < end, "the big jobs never reached the tokenizer"
            await asyncio.sleep(0.01)
        try:
            small = await asyncio.wait_for(live.core.embed(EmbedJob(texts=("w1",))), GUARD_S / 2)
            assert len(small.vectors) == 1
            assert not any(task.done() for task in big), "the big jobs were not held"
        finally:
            spy.gate.set()
        for task in big:
            assert len((await task).vectors) == 4


@pytest.mark.asyncio
async def test_big_jobs_take_turns_with_each_other(rel_toy_bundle: Path) -> None:
    """Jobs too big for the small lane are tokenised in chunks and take turns in the big lane."""

    def text(tag: str) -> str:
        return " ".join([tag] * 1600)  # 8k characters

    async with live_server(rel_toy_bundle) as live:
        spy = spy_on(live.core, hold_first_of=("w400", "w401"))

        def job(tag: str, count: int) -> asyncio.Future[Any]:
            return asyncio.ensure_future(
                live.core.embed(EmbedJob(texts=(text(tag),) * count, truncation="end"))
            )

        a, b = job("w400", 80), job("w401", 80)  # about 10 chunks each
        loop = asyncio.get_running_loop()
        end = loop.time() + GUARD_S
        while spy.held < 2:  # the first chunk of each holds both big-lane threads
            assert loop.time() < end, "the big jobs never reached the tokenizer"
            await asyncio.sleep(0.01)
        medium = job("w402", 3)  # 24k characters: the big-job lane
        pool = live.core._lanes.big
        while pool._work_queue.qsize() < 1:  # type: ignore[attr-defined]
            assert loop.time() < end, "the medium job was never queued"
            await asyncio.sleep(0.01)
        spy.gate.set()
        results = await asyncio.wait_for(asyncio.gather(a, b, medium), GUARD_S)
        assert [len(r.vectors) for r in results] == [80, 80, 3]
        calls = [tag for tag in spy.calls if tag in ("w400", "w401", "w402")]
        last_a = len(calls) - 1 - calls[::-1].index("w400")
        last_b = len(calls) - 1 - calls[::-1].index("w401")
        assert calls.index("w402") < min(last_a, last_b), calls


def _real_tokenizers() -> list[Any]:
    from tokenizers import Tokenizer

    from export.assets import minilm_dir, qwen2_tokenizer_source

    out = []
    for folder in (minilm_dir(), qwen2_tokenizer_source()):
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True
        out.append(tok)
    return out


PIECES = [
    *"abc xyz.,!?;:'\"\n\t",
    "  ",
    "é",
    "日本",
    "😀",
    "...",
    "\n\n",
    "-",
    "'s",
    "123",
    "e\u0301",
    "    ",
    "\r\n",
]


def test_prefix_count_is_a_lower_bound_for_the_real_tokenizers() -> None:
    """What makes the prefix check safe: the cut prefix never has more tokens than the text.

    MiniLM's WordPiece and gte-Qwen2's byte-level BPE (the real files), random texts mixing
    words, punctuation, whitespace runs, CRLF, combining marks, CJK and emoji.
    """
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from service.tokenizer import _cut

    tokenizers = _real_tokenizers()

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.sampled_from(PIECES), min_size=10, max_size=120), st.integers(8, 400))
    def check(parts: list[str], window: int) -> None:
        text = "".join(parts)
        cut = _cut(text, window)
        if cut <= 0:
            return
        for tok in tokenizers:
            head = len(tok.encode(text[:cut], add_special_tokens=False).ids)
            assert head <= len(tok.encode(text, add_special_tokens=False).ids), (text, cut)

    check()
