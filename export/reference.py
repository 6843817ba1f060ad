"""The oracle the validation gate trusts: a checkpoint's weights + its family's reference encoder.

The encoders (:mod:`export.reference_models`) share nothing with the export path: if transformers
ever changes how it builds masks or positions — the way gte-Qwen2 silently went causal in other
runtimes — the exported graph and the reference disagree, and the gate fails. Float64 by
default; float32 for models too large for that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.manifest import Pooling
from export.families import FAMILIES, FamilySpec
from export.reference_models import ReferenceOutput

__all__ = ["LazyWeights", "Reference", "ReferenceOutput"]


class LazyWeights(Mapping[str, torch.Tensor]):
    """The checkpoint's tensors, read from safetensors on every access and converted to ``dtype``.

    Nothing is cached: the reference walks the layers in order, so at any moment it holds one
    layer's weights (plus activations), not a second copy of the model — for a 7B that is the
    difference between ~1 GB and 28 GB next to the ONNX Runtime session being validated.
    """

    def __init__(self, files: Sequence[Path], dtype: torch.dtype, strip: Sequence[str] = ()) -> None:
        from safetensors import safe_open

        self.dtype = dtype
        # safe_open's stub types the context-manager object, not the handle: keep handles as Any.
        self._handles: list[Any] = [safe_open(str(path), framework="pt") for path in files]
        self._index: dict[str, tuple[int, str]] = {}
        for i, handle in enumerate(self._handles):
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                name = next((key[len(p) :] for p in strip if key.startswith(p)), key)
                self._index[name] = (i, key)

    def __getitem__(self, name: str) -> torch.Tensor:
        i, key = self._index[name]
        tensor: torch.Tensor = self._handles[i].get_tensor(key)
        return tensor.to(self.dtype)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class Reference:
    """The reference for one checkpoint: weights loaded once, ``encode`` per batch of id lists."""

    def __init__(
        self,
        family: FamilySpec | str,
        config: Mapping[str, Any],
        weight_files: Sequence[Path],
        pooling: Pooling,
        *,
        dtype: torch.dtype = torch.float64,
        causal: bool = False,
    ) -> None:
        self.spec = FAMILIES[family] if isinstance(family, str) else family
        self.config, self.pooling, self.causal = config, pooling, causal
        self.weights = LazyWeights(weight_files, dtype, (self.spec.weight_prefix,))

    def encode(self, seqs: Sequence[Sequence[int]]) -> ReferenceOutput:
        with torch.no_grad():
            return self.spec.reference(
                self.weights, self.config, seqs, pooling=self.pooling, causal=self.causal
            )
