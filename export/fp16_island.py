"""``Fp16Island``: a block that runs in fp16 inside a model whose edges stay fp32.

The families' ``fp16_islands`` wrap their heavy blocks in it (see :mod:`export.families`); the
residual stream between islands stays fp32, which is where Qwen2-class models overflow fp16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


class Fp16Island(nn.Module):
    """Runs ``inner`` (already in fp16) on fp16 copies of its inputs; returns fp32 outputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.half()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(
            *_cast(args, torch.float16), **{k: _cast(v, torch.float16) for k, v in kwargs.items()}
        )
        return _cast(out, torch.float32)
