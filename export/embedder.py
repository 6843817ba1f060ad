"""The PyTorch modules that get exported: stock backbone + in-graph pooling + L2 normalisation.

The graph contract is ``(input_ids, attention_mask) -> (sentence_embedding, embedding_norm)``.
Pooling lives in the graph so ``[batch, seq, hidden]`` never leaves the device. The norm is an
output so the service can return unnormalised (and, after renormalising, truncated) vectors from
the same graph.

Two choices make every text's vector independent of how it was padded:

* ``position_ids = cumsum(mask) - 1`` (clamped at 0), passed explicitly: a left-padded row gets
  the same positions as the unpadded text, so RoPE (Qwen2) and absolute position embeddings
  (BERT) see identical inputs whatever the padding side.
* Pooling finds real tokens from the mask, never from a padding-side assumption: last token is
  ``argmax(mask * arange)``, first token is ``argmax(mask)``, mean is mask-weighted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bundle.manifest import Pooling
from export.checkpoint import Checkpoint


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool ``hidden`` [B, S, H] over the real tokens of ``mask`` [B, S] into [B, H]."""
    if pooling == "mean":
        # A batched MatMul [B,1,S]·[B,S,H], not Mul + ReduceSum: ONNX Runtime's ReduceSum over the
        # sequence axis sums in a different order for different batch shapes (a text's vector
        # moved by ~1e-7 with its neighbours), while each MatMul row is computed the same way
        # whatever the batch — bit-identical alone, batched and padded.
        weights = mask.to(hidden.dtype).unsqueeze(1)
        summed = torch.matmul(weights, hidden).squeeze(1)
        return summed / weights.sum(dim=2).clamp_min(1e-9)
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype).unsqueeze(0)
    # "cls" takes the first real token, wherever padding put it
    index = (mask * positions).argmax(dim=1) if pooling == "last_token" else mask.argmax(dim=1)
    gather = index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, gather).squeeze(1)


class Embedder(nn.Module):
    """Backbone → pooled fp32 vector → (L2-normalised vector, its pre-normalisation norm)."""

    def __init__(self, backbone: nn.Module, pooling: Pooling, *, token_type_ids: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling: Pooling = pooling
        self.token_type_ids = token_type_ids

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"position_ids": position_ids}
        if self.token_type_ids:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        # Pool and normalise in fp32 whatever the backbone's precision: the norm of a 3584-dim
        # fp16 vector can itself overflow, and the service contract is float32.
        pooled = pool(hidden.last_hidden_state.float(), attention_mask, self.pooling)
        norm = torch.linalg.vector_norm(pooled, dim=-1)
        return pooled / norm.clamp_min(1e-12).unsqueeze(-1), norm


def build_embedder(
    ckpt: Checkpoint,
    *,
    dtype: torch.dtype = torch.float32,
    causal: bool = False,
    pooling: Pooling | None = None,
) -> Embedder:
    """The exportable module for ``ckpt``: its family's stock backbone (no remote code, one copy of
    the weights) + pooling. ``causal`` and ``pooling`` are test hooks that build a wrong graph."""
    backbone = ckpt.family.load_backbone(ckpt.folder, dtype, causal).eval()
    return Embedder(backbone, pooling or ckpt.pooling, token_type_ids=ckpt.family.token_type_ids).eval()
