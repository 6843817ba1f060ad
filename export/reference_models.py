"""The independent reference encoders (float64 PyTorch from the state dict), one per family.

Written from the published architectures, deliberately sharing nothing with the export path (no
transformers modules, no mask builders, no sdpa). Each takes unpadded id lists, pads right
*here*, uses positions 0..n-1 per row, and masks padded keys only (bidirectional; ``causal=True``
exists for tests that show the gate can tell the two apart). :class:`export.reference.Reference`
picks the family's encoder from its :class:`~export.families.FamilySpec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from bundle.manifest import Pooling
from export.errors import UnsupportedArchitecture

Weights = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ReferenceOutput:
    """Normalised embeddings [B, H], their pre-normalisation norms [B], and a numerics probe."""

    embeddings: np.ndarray
    norms: np.ndarray
    max_abs_residual: float  # largest |value| in the residual stream: the fp16 overflow risk


def _pad_right(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        valid[row, : len(seq)] = True
    return ids, valid


def _key_bias(valid: torch.Tensor, dtype: torch.dtype, causal: bool) -> torch.Tensor:
    """Additive attention bias [B, 1, S, S]: -inf on padded keys (and on future keys if causal)."""
    width = valid.shape[1]
    allowed = valid[:, None, None, :].expand(-1, 1, width, width)
    if causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool).tril()
    bias = torch.zeros(allowed.shape, dtype=dtype)
    return bias.masked_fill(~allowed, float("-inf"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return torch.softmax(scores, dim=-1) @ v


def _pool(hidden: torch.Tensor, valid: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    lengths = valid.sum(dim=1)
    rows = []
    for row in range(hidden.shape[0]):
        real = hidden[row, : int(lengths[row])]
        rows.append({"last_token": real[-1], "mean": real.mean(dim=0), "cls": real[0]}[pooling])
    return torch.stack(rows)


def _finish(pooled: torch.Tensor, max_abs: float) -> ReferenceOutput:
    norms = pooled.norm(dim=-1)
    return ReferenceOutput((pooled / norms[:, None]).double().numpy(), norms.double().numpy(), max_abs)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qwen2_encode(
    w: Weights,
    config: Mapping[str, Any],
    seqs: Sequence[Sequence[int]],
    *,
    pooling: Pooling = "last_token",
    causal: bool = False,
) -> ReferenceOutput:
    """Qwen2 encoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP; bidirectional by default."""
    dtype = w["norm.weight"].dtype
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    eps = float(config.get("rms_norm_eps", 1e-6))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        # An ExportError, so the CLI reports it (exit code) instead of a traceback.
        raise UnsupportedArchitecture(
            f"the reference supports default RoPE only, not {rope.get('rope_type')!r}"
        )
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))

    ids, valid = _pad_right(seqs)
    batch, width = ids.shape
    x = w["embed_tokens.weight"][ids]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    angles = torch.arange(width, dtype=dtype)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    bias = _key_bias(valid, dtype, causal)
    max_abs = float(x.abs().max())

    def proj(h: torch.Tensor, name: str, n: int) -> torch.Tensor:
        out = h @ w[f"{name}.weight"].T
        if f"{name}.bias" in w:
            out = out + w[f"{name}.bias"]
        return out.view(batch, width, n, head_dim).transpose(1, 2)

    for layer in range(int(config["num_hidden_layers"])):
        p = f"layers.{layer}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = _rotate(proj(h, p + "self_attn.q_proj", heads), cos, sin)
        k = _rotate(proj(h, p + "self_attn.k_proj", kv_heads), cos, sin)
        v = proj(h, p + "self_attn.v_proj", kv_heads)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        ctx = _attend(q, k, v, bias).transpose(1, 2).reshape(batch, width, heads * head_dim)
        x = x + ctx @ w[p + "self_attn.o_proj.weight"].T
        max_abs = max(max_abs, float(x[valid].abs().max()))
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        max_abs = max(max_abs, float(x[valid].abs().max()))
    x = _rms(x, w["norm.weight"], eps)
    return _finish(_pool(x, valid, pooling), max_abs)


def _layer_norm(x: torch.Tensor, w: Weights, name: str, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise UnsupportedArchitecture(f"the reference has no activation {kind!r}")


def bert_encode(
    w: Weights,
    config: Mapping[str, Any],
    seqs: Sequence[Sequence[int]],
    *,
    pooling: Pooling = "mean",
    causal: bool = False,
) -> ReferenceOutput:
    """BERT encoder: absolute positions, post-LayerNorm blocks, GELU MLP; bidirectional."""
    dtype = w["embeddings.LayerNorm.weight"].dtype
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim, eps = hidden // heads, float(config.get("layer_norm_eps", 1e-12))
    ids, valid = _pad_right(seqs)
    batch, width = ids.shape
    e = "embeddings."
    x = (
        w[e + "word_embeddings.weight"][ids]
        + w[e + "position_embeddings.weight"][:width][None]
        + w[e + "token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w, e + "LayerNorm", eps)
    bias = _key_bias(valid, dtype, causal)
    max_abs = float(x.abs().max())

    def linear(h: torch.Tensor, name: str) -> torch.Tensor:
        return h @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, width, heads, head_dim).transpose(1, 2)

    for layer in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{layer}."
        q, k, v = (split(linear(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        ctx = _attend(q, k, v, bias).transpose(1, 2).reshape(batch, width, hidden)
        x = _layer_norm(
            x + linear(ctx, p + "attention.output.dense"), w, p + "attention.output.LayerNorm", eps
        )
        inner = _gelu(linear(x, p + "intermediate.dense"), str(config.get("hidden_act", "gelu")))
        x = _layer_norm(x + linear(inner, p + "output.dense"), w, p + "output.LayerNorm", eps)
        max_abs = max(max_abs, float(x[valid].abs().max()))
    return _finish(_pool(x, valid, pooling), max_abs)


class Encoder(Protocol):
    """What a family's reference encoder looks like (``qwen2_encode``, ``bert_encode``)."""

    def __call__(
        self,
        w: Weights,
        config: Mapping[str, Any],
        seqs: Sequence[Sequence[int]],
        *,
        pooling: Pooling = ...,
        causal: bool = ...,
    ) -> ReferenceOutput: ...
