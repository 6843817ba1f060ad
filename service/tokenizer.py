"""Text → model input ids, following the bundle's policy exactly (never guessing it).

Policy (``manifest.tokenizer`` / ``manifest.prompts``):

* content ids = ``tokenizer.json`` with ``add_special_tokens=False`` and special-token parsing off,
  so a user who types ``<|endoftext|>`` gets the characters, not the EOS id;
* queries get ``prompts.query_template`` with the instruction (``task`` → bundle instruction, or a
  free-form ``instruction``, else the bundle's default task); documents are embedded as is;
* model input = ``prefix_ids + content + suffix_ids``; truncation only removes content ids of the
  user's text — never the instruction, never the special ids — and the count is exact.

Runs in a worker thread (``encode_batch`` is Rust and releases the GIL); no asyncio here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Encoding as HfEncoding
from tokenizers import Tokenizer

from bundle.manifest import Manifest, PromptSpec, TokenizerSpec
from service.domain import InputType, Tokenized, Truncation
from service.errors import InputTooLong, InvalidInput, UnknownTask

TEXT = "{text}"
TASK = "{task}"
# Truncation NONE: a rendered text longer than this many characters per allowed token is first
# tokenised only up to a cut between half and all of that window (see ``_refuse_too_long``), so
# an input far past the limit is refused without tokenising all of it. English runs at 4–5
# characters per token (WordPiece and byte-level BPE alike), so the cut, at 8 or more characters
# per allowed token, holds more tokens than the limit for any text of up to 8 characters a token.
PRECHECK_CHARS_PER_TOKEN = 16
PRECHECK_GROUP = 8  # prefixes tokenised per call: small enough to stop early, big enough to batch


class TextTokenizer:
    """Applies the manifest's instruction, special-token and truncation policy."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        spec: TokenizerSpec,
        prompts: PromptSpec,
        *,
        max_input_tokens: int,
        default_truncation: Truncation,
    ) -> None:
        self._tok = tokenizer
        # The bundle's tokenizer.json may carry padding/truncation settings from training; the
        # service pads in the batcher and truncates by its own policy, so both are switched off.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = True
        self.spec = spec
        self.prompts = prompts
        self.prefix = tuple(spec.prefix_ids)
        self.suffix = tuple(spec.suffix_ids)
        self.max_input_tokens = max_input_tokens
        self.default_truncation: Truncation = default_truncation
        room = max_input_tokens - len(self.prefix) - len(self.suffix)
        if room < 1:
            raise ValueError(f"max_input_tokens={max_input_tokens} leaves no room for content")
        self.max_content = room

    @classmethod
    def from_bundle(
        cls, directory: Path, manifest: Manifest, *, max_input_tokens: int, default_truncation: Truncation
    ) -> TextTokenizer:
        tok = Tokenizer.from_file(str(directory / manifest.tokenizer.file))
        return cls(
            tok,
            manifest.tokenizer,
            manifest.prompts,
            max_input_tokens=max_input_tokens,
            default_truncation=default_truncation,
        )

    @property
    def largest_id(self) -> int:
        """The highest id this tokenizer can emit (added tokens included)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=0)

    # --- instruction policy ------------------------------------------------------------------
    def resolve_instruction(
        self, input_type: InputType, task: str | None, instruction: str | None
    ) -> str | None:
        """The instruction text for this request, or None. Validates for documents too (typos)."""
        if task and instruction:
            raise InvalidInput("give either task or instruction, not both", field="task")
        if task and task not in self.prompts.tasks:
            known = ", ".join(sorted(self.prompts.tasks)) or "none"
            raise UnknownTask(f"unknown task {task!r}; this model knows: {known}", field="task")
        if instruction and self.prompts.query_template is None:
            raise InvalidInput("this model takes no instruction", field="instruction")
        if input_type != "query" or self.prompts.query_template is None:
            return None
        if instruction:
            return instruction
        name = task or self.prompts.default_task
        return self.prompts.tasks.get(name) if name else None

    def _render(self, text: str, instruction: str | None) -> tuple[str, int, int]:
        """Full text and the [start, end) span of the user's text inside it."""
        template = self.prompts.query_template
        if instruction is None or template is None:
            return text, 0, len(text)
        head, _, tail = template.partition(TEXT)
        head = head.replace(TASK, instruction)
        tail = tail.replace(TASK, instruction)
        return head + text + tail, len(head), len(head) + len(text)

    # --- encoding ----------------------------------------------------------------------------
    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType = "document",
        task: str | None = None,
        instruction: str | None = None,
        truncation: Truncation | None = None,
        first_index: int = 0,
    ) -> list[Tokenized]:
        """``first_index``: the request index of ``texts[0]`` (a request tokenised in chunks)."""
        resolved = self.resolve_instruction(input_type, task, instruction)
        rendered = [self._render(t, resolved) for t in texts]
        mode = truncation or self.default_truncation
        if mode == "none":
            self._refuse_too_long([r[0] for r in rendered], first_index)
        encodings = self._tok.encode_batch([r[0] for r in rendered], add_special_tokens=False)
        return [
            self._fit(enc.ids, _protected(enc, start, end, len(full)), mode, first_index + index)
            for index, (enc, (full, start, end)) in enumerate(zip(encodings, rendered, strict=True))
        ]

    def _refuse_too_long(self, texts: Sequence[str], first_index: int) -> None:
        """Refuse an over-limit input from a prefix of it, before tokenising it whole.

        The prefix ends just before a space that follows a non-space character: every
        pre-tokenizer in use (BERT's whitespace/punctuation split, the byte-level BPE regex of
        gte-Qwen2) starts a new piece there, so the prefix's pieces are the full text's first pieces
        and its token count is a lower bound of the full count. Only a count *above* the limit
        refuses; anything else falls through to the exact path, so nothing admissible is refused.
        """
        window = PRECHECK_CHARS_PER_TOKEN * (self.max_content + 1)
        cuts = [(i, _cut(text, window)) for i, text in enumerate(texts) if len(text) > window]
        cuts = [(i, cut) for i, cut in cuts if cut > 0]
        for start in range(0, len(cuts), PRECHECK_GROUP):  # stop at the first group that refuses
            group = cuts[start : start + PRECHECK_GROUP]
            heads = self._tok.encode_batch([texts[i][:cut] for i, cut in group], add_special_tokens=False)
            self._refuse_over(
                [(first_index + i, len(enc.ids)) for (i, _), enc in zip(group, heads, strict=True)]
            )

    def _refuse_over(self, counts: Sequence[tuple[int, int]]) -> None:
        """(request index, lower bound of its content tokens): refuse the first over the limit."""
        for index, content in counts:
            if content > self.max_content:
                total = content + len(self.prefix) + len(self.suffix)
                raise InputTooLong(
                    f"input {index} has at least {total} tokens, more than the limit of "
                    f"{self.max_input_tokens}; shorten it or ask for truncation END or START",
                    field=f"inputs[{index}]",
                )

    def encode_ids(
        self, id_lists: Sequence[Sequence[int]], *, truncation: Truncation | None = None
    ) -> list[Tokenized]:
        """Pre-tokenised content ids (OpenAI token input): checked against the vocabulary."""
        mode = truncation or self.default_truncation
        out = []
        for index, ids in enumerate(id_lists):
            bad = next((i for i in ids if not 0 <= i < self.spec.vocab_size), None)
            if bad is not None:
                raise InvalidInput(
                    f"token id {bad} in input {index} is outside the vocabulary "
                    f"(0..{self.spec.vocab_size - 1})",
                    field=f"token_inputs[{index}]",
                )
            out.append(self._fit(list(ids), (0, 0), mode, index))
        return out

    def _fit(self, content: list[int], protected: tuple[int, int], mode: Truncation, index: int) -> Tokenized:
        """Apply the truncation policy to content ids; ``protected`` = (head, tail) id counts kept."""
        over = len(content) - self.max_content
        if over <= 0:
            return Tokenized(self.prefix + tuple(content) + self.suffix, 0)
        total = len(content) + len(self.prefix) + len(self.suffix)
        if mode == "none":
            raise InputTooLong(
                f"input {index} has {total} tokens, more than the limit of {self.max_input_tokens}; "
                "shorten it or ask for truncation END or START",
                field=f"inputs[{index}]",
            )
        head, tail = protected
        middle = content[head : len(content) - tail]
        if over >= len(middle):
            raise InputTooLong(
                f"input {index}: the instruction alone ({head + tail} tokens) leaves no room for the text "
                f"within {self.max_input_tokens} tokens",
                field=f"inputs[{index}]",
            )
        kept = middle[: len(middle) - over] if mode == "end" else middle[over:]
        ids = content[:head] + kept + content[len(content) - tail :]
        return Tokenized(self.prefix + tuple(ids) + self.suffix, over)

    def tokens(self, ids: Sequence[int]) -> tuple[str, ...]:
        return tuple(self._tok.id_to_token(i) or "" for i in ids)


def _cut(text: str, window: int) -> int:
    """Where to cut ``text`` for the prefix check: the last ``" "`` after a non-space within
    ``window`` (and past its first half); 0 when there is none (no prefix check)."""
    at = text.rfind(" ", window // 2, window)
    while at > window // 2 and text[at - 1].isspace():
        at = text.rfind(" ", window // 2, at)
    return at if at > window // 2 else 0


def _protected(enc: HfEncoding, start: int, end: int, length: int) -> tuple[int, int]:
    """How many leading / trailing ids belong wholly to the template, outside the user's text.

    A token that straddles the boundary (BPE merges the template's space into the first word)
    counts as text, so truncation may drop it; the instruction's own tokens are never dropped.
    """
    offsets = enc.offsets
    head = 0
    if start > 0:
        while head < len(offsets) and offsets[head][1] <= start:
            head += 1
    tail = 0
    if end < length:
        while tail < len(offsets) - head and offsets[len(offsets) - 1 - tail][0] >= end:
            tail += 1
    return head, tail
