"""Scenario ``tokenize``: batch encode vs one call per text (issue 6 §6).

Why: tokenisation is a large share of embedding-serving time for short texts. HF ``tokenizers``
parallelises ``encode_batch`` in Rust and releases the GIL; a Python loop of ``encode`` does
neither. Measured on the real Qwen2 BPE and the real MiniLM WordPiece.
"""

from __future__ import annotations

import random
from pathlib import Path

from bench._common import Section, fmt_ms, ratio, round_robin, stats, table
from bench._models import CACHE

_VOCAB_TEXT = (
    "the of and to in is was for on that with as by at from his an were are which this be "
    "embedding vector search retrieval transformer attention model query document passage"
)
_WORDS = _VOCAB_TEXT.split()


def texts(n: int, words: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(words // 2, words))) for _ in range(n)]


def _tokenizers() -> dict[str, Path]:
    from export.assets import minilm_dir, write_qwen2_tokenizer

    qwen = CACHE / "qwen2-tokenizer"
    if not (qwen / "tokenizer.json").exists():
        write_qwen2_tokenizer(qwen)
    return {"Qwen2 BPE": qwen / "tokenizer.json", "MiniLM WordPiece": minilm_dir() / "tokenizer.json"}


def run(rounds: int, quick: bool, models: list[str] | None = None) -> Section:
    del models
    from tokenizers import Tokenizer

    section = Section("tokenize", "Tokenisation: batch encode vs per text (issue 6 §6)")
    rows = []
    for name, path in _tokenizers().items():
        tok = Tokenizer.from_file(str(path))
        tok.no_padding()  # the service pads per batch itself; MiniLM's file pads to 128
        tok.no_truncation()
        for n, words in [(32, 16), (256, 16), (32, 300)][: 2 if quick else 3]:
            batch = texts(n, words)
            samples = round_robin(
                {
                    "per-text": lambda b=batch, k=tok: [k.encode(t, add_special_tokens=False) for t in b],
                    "batch": lambda b=batch, k=tok: k.encode_batch(b, add_special_tokens=False),
                },
                max(rounds, 5),
            )
            per, bat = stats(samples["per-text"]), stats(samples["batch"])
            tokens = sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
            rows.append(
                [
                    name,
                    f"{n} × ≤{words} words",
                    tokens,
                    fmt_ms(per.median),
                    fmt_ms(bat.median),
                    f"{ratio(bat.median, per.median):.2f}×",
                    f"{tokens / bat.median / 1e3:.0f}k",
                ]
            )
    section.add("HF `tokenizers` (Rust), `add_special_tokens=False` as the service calls it; 2 cores.\n")
    section.add(
        table(
            ["tokenizer", "texts", "tokens", "per-text ms", "batch ms", "batch speed-up", "batch tokens/s"],
            rows,
        )
    )
    return section
