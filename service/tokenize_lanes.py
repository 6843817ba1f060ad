"""Where tokenisation runs: two lanes of threads, so a one-word request never waits behind megabytes.

``encode_batch`` is Rust and releases the GIL, so threads give real parallelism. Jobs up to
``SMALL_JOB_CHARS`` characters (or token ids) have a thread of their own; bigger jobs share two and
are fed in chunks of about ``CHUNK_CHARS`` characters, one chunk of each job queued at a time, so big
jobs take turns instead of waiting for whole requests ahead of them.

Jobs up to ``INLINE_CHARS`` (a search query, a sentence) are tokenised right on the event loop: that
takes tens of microseconds, less than the hop to a thread and back (a queue, two wake-ups and the
loop's self-pipe: ~0.1 ms of CPU, measured), and such a job never waits behind another either.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from service.domain import EmbedJob, Tokenized, TokenizeJob
from service.errors import InvalidInput
from service.tokenizer import TextTokenizer

INLINE_CHARS = 512
SMALL_JOB_CHARS = 16_384
CHUNK_CHARS = 65_536


def chunks(texts: tuple[str, ...], limit: int = CHUNK_CHARS) -> list[tuple[int, tuple[str, ...]]]:
    """Consecutive runs of ``texts`` of about ``limit`` characters: (index of the first, texts)."""
    out: list[tuple[int, tuple[str, ...]]] = []
    start, size = 0, 0
    for index, text in enumerate(texts):
        if index > start and size + len(text) > limit:
            out.append((start, texts[start:index]))
            start, size = index, 0
        size += len(text)
    if start < len(texts):
        out.append((start, texts[start:]))
    return out


class TokenizeLanes:
    """The small-job lane (one thread) and the big-job lane (two threads, chunked, jobs take turns)."""

    def __init__(self) -> None:
        self.big = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embed-tokenize")
        self.small = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-tokenize-small")

    async def run(self, job: EmbedJob | TokenizeJob, tokenizer: TextTokenizer) -> list[Tokenized]:
        loop = asyncio.get_running_loop()
        if isinstance(job, EmbedJob) and job.token_ids:
            if job.task or job.instruction:
                raise InvalidInput("instructions apply to text inputs only, not token ids", field="task")
            size = sum(len(ids) for ids in job.token_ids)
            call = partial(tokenizer.encode_ids, job.token_ids, truncation=job.truncation)
            if size <= INLINE_CHARS:
                return call()
            return await loop.run_in_executor(self.small if size <= SMALL_JOB_CHARS else self.big, call)
        encode = partial(
            tokenizer.encode_texts,
            input_type=job.input_type,
            task=job.task,
            instruction=job.instruction,
            truncation=job.truncation,
        )
        size = sum(len(text) for text in job.texts) + len(job.instruction or "")
        if size <= INLINE_CHARS:
            return encode(job.texts)
        if size <= SMALL_JOB_CHARS:
            return await loop.run_in_executor(self.small, partial(encode, job.texts))
        out: list[Tokenized] = []
        for first, part in chunks(job.texts):  # one chunk queued per job: jobs take turns
            out += await loop.run_in_executor(self.big, partial(encode, part, first_index=first))
        return out

    def shutdown(self) -> None:
        self.big.shutdown(wait=False, cancel_futures=True)
        self.small.shutdown(wait=False, cancel_futures=True)
