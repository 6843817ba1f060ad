"""Offline assets: the tiny gte-Qwen2 is laid out like the real repo, with the real Qwen2 BPE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.assets import QWEN2_EOS_ID, _verified, minilm_dir
from export.checkpoint import load_checkpoint, load_hf_tokenizer
from export.errors import SourceError


def test_tiny_checkpoint_layout(tiny_qwen2_checkpoint: Path) -> None:
    config = json.loads((tiny_qwen2_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["is_causal"] is False
    assert config["vocab_size"] == 151646 and config["hidden_size"] == 64
    pooling = json.loads((tiny_qwen2_checkpoint / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] is True and pooling["pooling_mode_mean_tokens"] is False
    prompts = json.loads((tiny_qwen2_checkpoint / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"].startswith("Instruct: Given a web search query") and prompts["query"].endswith(
        "\nQuery: "
    )
    for name in ("model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "modules.json"):
        assert (tiny_qwen2_checkpoint / name).is_file(), name


def test_real_qwen2_tokenizer_ids(tiny_qwen2_checkpoint: Path) -> None:
    tok = load_hf_tokenizer(tiny_qwen2_checkpoint)
    assert len(tok) == 151646
    assert tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids("<|endoftext|>") == QWEN2_EOS_ID
    # Known Qwen2 ids (tooling.md §6; torchtune PR #2512 for the chat markers).
    assert tok("Hello, world!", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0]
    assert tok("你好，世界！", add_special_tokens=False)["input_ids"] == [108386, 3837, 99489, 6313]
    assert tok("<|im_start|>user\nHello world!<|im_end|>", add_special_tokens=False)["input_ids"] == [
        151644,
        872,
        198,
        9707,
        1879,
        0,
        151645,
    ]


def test_checkpoint_policy(tiny_qwen2_checkpoint: Path) -> None:
    ckpt = load_checkpoint(tiny_qwen2_checkpoint)
    assert ckpt.family.name == "qwen2" and ckpt.pooling == "last_token"
    assert ckpt.prefix_ids == [] and ckpt.suffix_ids == [QWEN2_EOS_ID]
    assert ckpt.prompts.default_task == "web_search"
    assert ckpt.prompts.tasks["web_search"].startswith("Given a web search query")


def test_minilm_is_verified_and_tamper_is_caught(tmp_path: Path) -> None:
    folder = minilm_dir()
    assert (folder / "model.safetensors").stat().st_size == 90_868_376
    copy = tmp_path / "m"
    copy.mkdir()
    shutil.copy(folder / "config.json", copy / "config.json")
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(SourceError, match="sha256"):
        _verified(copy, {"config.json": "0" * 64}, "pkg")


def test_resolve_sources(tmp_path: Path) -> None:
    from export.source import resolve

    assert resolve("builtin:all-MiniLM-L6-v2", tmp_path).folder == minilm_dir()
    tiny = resolve("builtin:tiny-gte-qwen2", tmp_path)
    assert tiny.kind == "builtin" and (tiny.folder / "config.json").is_file()
    assert resolve(str(tiny.folder), tmp_path).kind == "folder"
    with pytest.raises(SourceError, match="does not exist"):
        resolve("./not-here/model", tmp_path)  # a relative path, not a hub id
