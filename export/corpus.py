"""Fixed inputs for validation and golden vectors, tokenised by the Hugging Face path.

The token ids here come from ``transformers.AutoTokenizer`` — a different code path from the
``tokenizers.Tokenizer`` the service uses — and the two are cross-checked at export time, so a
bundle whose tokenizer.json would tokenise differently from the model's own tokenizer is refused.
Special-token parsing is off (``split_special_tokens``): user text that spells ``<|endoftext|>``
must not become the EOS id the model pools on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.manifest import InputType, PromptSpec
from export.checkpoint import Checkpoint, load_hf_tokenizer
from export.errors import TokenizerMismatch

TEXTS: list[str] = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "Emoji check 🍕🎉👍🏽 and a family 👨‍👩‍👧 emoji.",
    "Ich liebe Programmierung und Datenbanken.",
    "Русский текст для проверки токенизатора.",
    "مرحبا بالعالم",
    "User text spelling <|endoftext|> or [SEP] must stay plain text.",
]
QUERY = "what is the capital of France?"
GOLDEN_TEXTS = [TEXTS[0], TEXTS[2], TEXTS[3], TEXTS[7]]


@dataclass(frozen=True)
class Example:
    text: str
    input_type: InputType
    task: str | None
    token_ids: list[int]


class CorpusTokenizer:
    """Applies the manifest's tokenizer policy with the HF tokenizer (the independent path)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.hf: Any = load_hf_tokenizer(ckpt.folder)

    def content_ids(self, text: str) -> list[int]:
        ids = self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    def example(
        self, text: str, input_type: InputType = "document", prompts: PromptSpec | None = None
    ) -> Example:
        task = None
        model_text = text
        if input_type == "query" and prompts is not None and prompts.query_template is not None:
            task = prompts.default_task
            instruction = prompts.tasks[task] if task else ""
            model_text = prompts.query_template.format(task=instruction, text=text)
        limit = self.ckpt.max_input_tokens - len(self.ckpt.prefix_ids) - len(self.ckpt.suffix_ids)
        ids = self.ckpt.prefix_ids + self.content_ids(model_text)[:limit] + self.ckpt.suffix_ids
        return Example(text, input_type, task, ids)

    def write_bundle_tokenizer(self, dst: Path) -> None:
        """Write the model's tokenizer.json without padding/truncation settings (some repos, e.g.
        all-MiniLM-L6-v2, ship fixed-length padding), then check it tokenises like the model."""
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(self.ckpt.folder / "tokenizer.json"))
        fast.no_padding()
        fast.no_truncation()
        fast.save(str(dst))
        self.check_against(dst)

    def check_against(self, tokenizer_json: Path) -> None:
        """Refuse a tokenizer.json that tokenises differently from the model's HF tokenizer."""
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(tokenizer_json))
        fast.encode_special_tokens = True
        for text in [*TEXTS, QUERY]:
            theirs = fast.encode(text, add_special_tokens=False).ids
            ours = self.content_ids(text)
            if list(theirs) != ours:
                raise TokenizerMismatch(
                    f"{tokenizer_json} tokenises {text!r} as {list(theirs)[:12]}… but the model's "
                    f"tokenizer gives {ours[:12]}…; the bundle would serve different ids"
                )


def validation_sequences(
    tok: CorpusTokenizer, prompts: PromptSpec, max_length: int, seed: int = 0
) -> list[list[int]]:
    """The validation corpus: real texts (incl. an instructed query) plus random ids of lengths 1..N.

    Random sequences keep the family's framing (EOS last for qwen2, [CLS]…[SEP] for BERT) so the
    pooled position is the realistic one, and cover every length class up to ``max_length``.
    """
    ckpt = tok.ckpt
    seqs = [tok.example(t).token_ids[:max_length] for t in TEXTS]
    seqs.append(tok.example(QUERY, "query", prompts).token_ids[-max_length:])
    rng = random.Random(seed)
    lengths = sorted({1, 2, 3, 5, 8, 13, 21, 34, max_length // 2, max_length})
    for length in (n for n in lengths if 1 <= n <= max_length):
        ids = [rng.randrange(0, min(ckpt.tokenizer_vocab_size, ckpt.vocab_size)) for _ in range(length)]
        if ckpt.prefix_ids:
            ids[0] = ckpt.prefix_ids[0]
        if ckpt.suffix_ids and (length >= 2 or not ckpt.prefix_ids):
            ids[-1] = ckpt.suffix_ids[-1]
        seqs.append(ids)
    return seqs
