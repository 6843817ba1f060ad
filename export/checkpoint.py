"""Read and check a checkpoint folder before any expensive work starts.

Everything that can be wrong with the *input* is detected here, in seconds, with a message that
names the file: a missing folder, an unsupported ``model_type``, truncated safetensors, a
tokenizer whose ids do not fit the embedding table. Only a folder that passes goes on to the
(minutes-long, memory-hungry) export.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundle.manifest import Pooling, PromptSpec
from export.errors import CheckpointError, SourceError, TokenizerMismatch, UnsupportedArchitecture
from export.families import FamilySpec, family_for

_INSTRUCT = re.compile(r"^Instruct: (?P<task>.*)\nQuery: ?$", re.DOTALL)
_POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_lasttoken": "last_token",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder and the policies derived from it."""

    folder: Path
    config: dict[str, Any]
    family: FamilySpec
    pooling: Pooling
    weight_files: list[Path]
    max_input_tokens: int
    prefix_ids: list[int]
    suffix_ids: list[int]
    pad_id: int
    eos_token: str | None
    eos_id: int | None
    tokenizer_vocab_size: int
    lowercase: bool
    prompts: PromptSpec
    content_sha256: str = field(repr=False)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def num_parameters_estimate(self) -> int:
        """Parameter count from the safetensors headers (no tensor is read), for memory planning."""
        return sum(_header_parameters(p) for p in self.weight_files)


def _header_parameters(path: Path) -> int:
    """Sum of tensor sizes declared in a safetensors header (8-byte length + JSON)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            total += count
    return total


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc})") from exc


def folder_sha256(folder: Path) -> str:
    """Hash of every file's relative path and content, so a folder source is reproducible."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files, each opened once so a truncated or corrupt file fails here."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: only pickle weights (*.bin) found; convert them to safetensors")
    else:
        raise CheckpointError(f"{folder}: no model.safetensors (or model.safetensors.index.json)")
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the safetensors index but missing")
        try:
            with safe_open(str(path), framework="pt") as fh:
                if not list(fh.keys()):
                    raise CheckpointError(f"{path}: holds no tensors")
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own Rust error type
            raise CheckpointError(f"{path}: unreadable safetensors (truncated or corrupt?): {exc}") from exc
    return files


def _pooling(folder: Path, family: FamilySpec) -> Pooling:
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return family.default_pooling
    raw = _read_json(path)
    chosen = [mode for key, mode in _POOLING_KEYS.items() if raw.get(key)]
    others = [k for k, v in raw.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_KEYS]
    if others or len(chosen) != 1 or chosen[0] not in family.poolings:
        raise UnsupportedArchitecture(
            f"{path}: pooling {chosen + others} is not supported for family {family.name} "
            f"(supported: {sorted(family.poolings)})"
        )
    return chosen[0]


def _prompts(folder: Path, family: FamilySpec) -> PromptSpec:
    """Tasks from ``config_sentence_transformers.json`` prompts, for families with instructions."""
    if family.query_template is None:
        return PromptSpec(query_template=None)
    tasks = dict(family.default_tasks)  # the family's own instructions (gte: web_search) always exist
    default = next(iter(tasks), None)
    path = folder / "config_sentence_transformers.json"
    raw = _read_json(path) if path.is_file() else {}
    for name, prompt in (raw.get("prompts") or {}).items():
        match = _INSTRUCT.match(prompt or "")
        if match is None:
            continue  # e.g. "document": "" — documents are never prefixed
        instruction = match.group("task")
        if instruction in family.default_tasks.values():
            continue
        tasks[name] = instruction
        if name == "query" or name == raw.get("default_prompt_name"):
            default = name
    return PromptSpec(query_template=family.query_template, tasks=tasks, default_task=default)


def _max_input_tokens(folder: Path, config: dict[str, Any]) -> int:
    limits = [int(config["max_position_embeddings"])]
    st = folder / "sentence_bert_config.json"
    if st.is_file() and _read_json(st).get("max_seq_length"):
        limits.append(int(_read_json(st)["max_seq_length"]))
    return min(limits)


def load_hf_tokenizer(folder: Path) -> Any:
    """The Hugging Face tokenizer for ``folder`` (the independent path used for golden ids)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unusable tokenizer folders
        raise TokenizerMismatch(f"{folder}: the tokenizer cannot be loaded: {exc}") from exc


def load_checkpoint(folder: Path) -> Checkpoint:
    """Check ``folder`` and derive family, pooling, tokenizer and prompt policy from it."""
    if not folder.exists():
        raise SourceError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise SourceError(f"model path {folder} is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; is this a Hugging Face checkpoint folder?")
    config = _read_json(config_path)
    family = family_for(config.get("model_type"))
    for key in ("hidden_size", "vocab_size", "num_hidden_layers", "max_position_embeddings"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{config_path}: missing or non-integer {key!r}")
    weights = _weight_files(folder)
    pooling = _pooling(folder, family)

    if not (folder / "tokenizer.json").is_file():
        raise TokenizerMismatch(f"{folder}: no tokenizer.json (the bundle ships it for the service)")
    tok = load_hf_tokenizer(folder)
    tok_vocab = len(tok)
    if tok_vocab > config["vocab_size"]:
        raise TokenizerMismatch(
            f"{folder}: the tokenizer has {tok_vocab} ids but the model's embedding table has "
            f"{config['vocab_size']} rows (config.json vocab_size); wrong tokenizer for this model?"
        )
    prefix: list[int] = []
    suffix: list[int] = []
    eos_token: str | None = None
    eos_id: int | None = None
    if family.append_eos:
        eos_token = tok.eos_token
        eos_id = tok.convert_tokens_to_ids(eos_token) if eos_token else None
        if eos_token is None or eos_id is None or eos_id == tok.unk_token_id:
            raise TokenizerMismatch(
                f"{folder}: the tokenizer defines no EOS token, which {family.name} pools"
            )
        suffix = [int(eos_id)]
    if family.wrap_cls_sep:
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise TokenizerMismatch(f"{folder}: the tokenizer lacks [CLS]/[SEP], which {family.name} needs")
        prefix, suffix = [int(tok.cls_token_id)], [int(tok.sep_token_id)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    if pad_id is None:
        raise TokenizerMismatch(f"{folder}: the tokenizer defines neither a pad nor an EOS token")

    return Checkpoint(
        folder=folder,
        config=config,
        family=family,
        pooling=pooling,
        weight_files=weights,
        max_input_tokens=_max_input_tokens(folder, config),
        prefix_ids=prefix,
        suffix_ids=suffix,
        pad_id=int(pad_id),
        eos_token=eos_token,
        eos_id=None if eos_id is None else int(eos_id),
        tokenizer_vocab_size=tok_vocab,
        lowercase=bool(getattr(tok, "do_lower_case", False) or tok.init_kwargs.get("do_lower_case", False)),
        prompts=_prompts(folder, family),
        content_sha256=folder_sha256(folder),
    )
