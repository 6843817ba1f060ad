"""What one runtime call costs: compute-equivalent tokens and activation memory.

Why not just ``batch × longest``: attention is quadratic in length. Per token and layer the
projections and MLP cost a fixed number of FLOPs, while attention costs ``4 · L · hidden`` more,
so a 32k-token document is worth far more than 32k short-text tokens (for gte-Qwen2-7B the
attention term equals the whole linear cost at L ≈ 32k; for a 64-wide test model at L ≈ 288).
The budget ``max_batch_tokens`` is counted in *linear-equivalent* tokens:

    tokens(B, L) = B · L · (1 + L / L_eq),   L_eq = linear FLOPs per token per layer / (4 · hidden)

Memory is predicted from the graph the bundle ships: a graph that computes attention in query
blocks (``graph.attention_query_chunk``) holds ``heads × chunk × L`` scores, an unchunked one
``heads × L²`` — which is what makes a 32k input impossible without the chunked export. A batch
whose prediction passes ``max_batch_memory_bytes`` is never formed (the batcher splits it) and a
single input that cannot fit is refused with a message saying why, instead of crashing the
process with an out-of-memory kill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bundle.manifest import Manifest, ModelShape

FLOAT_BYTES = 4  # activations are fp32 on every precision the CPU/CUDA graphs use


def batch_cost(batch_size: int, longest: int) -> int:
    """Padded tokens: what every layer's GEMMs pay for a right-padded batch."""
    return batch_size * longest


@dataclass(frozen=True)
class CostModel:
    """Cost of a ``batch × longest`` runtime call; built once from the manifest."""

    max_batch_tokens: int
    max_batch_memory_bytes: int | None = None
    shape: ModelShape | None = None
    attention_chunk: int | None = None
    mlp_chunk: int | None = None

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, *, max_batch_tokens: int, max_batch_memory_bytes: int | None
    ) -> CostModel:
        shape = manifest.shape or _guess_shape(manifest.dim)
        return cls(
            max_batch_tokens=max_batch_tokens,
            max_batch_memory_bytes=max_batch_memory_bytes,
            shape=shape,
            attention_chunk=manifest.graph.attention_query_chunk,
            mlp_chunk=manifest.graph.mlp_chunk,
        )

    @property
    def quadratic_length(self) -> float:
        """``L_eq``: the length at which attention costs as much as everything else."""
        if self.shape is None:
            return math.inf
        s = self.shape
        head_dim = s.hidden_size // max(s.num_heads, 1)
        kv = s.num_kv_heads * head_dim
        linear = 2 * (2 * s.hidden_size * s.hidden_size + 2 * s.hidden_size * kv) + 6 * s.hidden_size * (
            s.intermediate_size
        )
        return linear / (4 * s.hidden_size)

    def tokens(self, batch_size: int, longest: int) -> int:
        """Linear-equivalent tokens of the call (``batch_cost`` plus the attention term)."""
        return math.ceil(batch_cost(batch_size, longest) * (1 + longest / self.quadratic_length))

    def memory_bytes(self, batch_size: int, longest: int) -> int:
        """Peak activation memory of one layer of the call, predicted from the shipped graph."""
        if self.shape is None:
            return 0
        s, b, n = self.shape, batch_size, longest
        head_dim = s.hidden_size // max(s.num_heads, 1)
        hidden = 6 * b * n * s.hidden_size + 2 * b * n * s.num_kv_heads * head_dim
        mlp_rows = min(n, self.mlp_chunk) if self.mlp_chunk else n
        mlp = 3 * b * mlp_rows * s.intermediate_size
        queries = min(n, self.attention_chunk) if self.attention_chunk else n
        # scores + probabilities, and without chunking the exporter's [B,1,S,S] mask as well
        attention = 2 * b * s.num_heads * queries * n + (0 if self.attention_chunk else b * n * n)
        return FLOAT_BYTES * (hidden + mlp + attention)

    def fits(self, batch_size: int, longest: int) -> bool:
        if self.tokens(batch_size, longest) > self.max_batch_tokens:
            return False
        return self.max_batch_memory_bytes is None or (
            self.memory_bytes(batch_size, longest) <= self.max_batch_memory_bytes
        )

    def max_single_input(self, limit: int) -> int:
        """The longest input (≤ ``limit``) whose single-input call fits the memory budget."""
        budget = self.max_batch_memory_bytes
        if budget is None or self.memory_bytes(1, limit) <= budget:
            return limit
        low, high = 1, limit  # memory grows with length: binary search the largest fit
        while low < high:
            mid = (low + high + 1) // 2
            if self.memory_bytes(1, mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return low


def _guess_shape(dim: int) -> ModelShape:
    """Older bundles without ``shape``: a BERT-like guess (64-wide heads, 4× MLP), no GQA."""
    heads = max(dim // 64, 1)
    return ModelShape(
        hidden_size=dim, num_layers=1, num_heads=heads, num_kv_heads=heads, intermediate_size=4 * dim
    )
