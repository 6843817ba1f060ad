"""The benchmark's and the GPU check's pure helpers (no timings asserted)."""

from __future__ import annotations

import pytest

from bench import gpu_check
from bench._common import Section, padded_waste, percentile, ratio, round_robin, stats, update_report
from bench.waste import fifo_batches, mixed_lengths


def test_stats_and_percentiles() -> None:
    s = stats([1.0, 3.0, 2.0, 10.0, 2.0])
    assert s.median == 2.0 and s.low == 1.0 and s.high == 10.0 and s.spread_pct == pytest.approx(450.0)
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert ratio(0.5, 1.0) == 2.0


def test_round_robin_interleaves() -> None:
    calls: list[str] = []
    samples = round_robin(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1
    )
    assert calls == ["a", "b"] * 4 and all(len(v) == 3 for v in samples.values())


def test_padded_waste_and_fifo() -> None:
    assert padded_waste([[10, 10], [5]]) == 0.0
    assert padded_waste([[10, 30]]) == pytest.approx(1 - 40 / 60)
    batches = fifo_batches([10, 10, 500, 10], max_tokens=1000, max_size=8)
    assert batches == [[10, 10], [500, 10]]  # 3 × 500 breaks the budget; 2 × 500 does not
    lengths = mixed_lengths(1000)
    assert 0.15 < sum(n >= 200 for n in lengths) / 1000 < 0.25


def test_update_report_replaces_only_its_section() -> None:
    one = update_report("# B\n", "raw", "old\n")
    both = update_report(one, "long", "L\n")
    again = update_report(both, "raw", "new\n")
    assert "new" in again and "old" not in again and "L" in again
    assert again.index("raw") < again.index("long")
    assert "*Command:* `cmd`" in Section("x", "X", ["body"]).render("cmd")


def test_gpu_check_flops_and_mfu() -> None:
    seven_b = gpu_check.SEVEN_B
    # 6.525 B MatMul weights in 28 layers (export-feasibility.md §1.1).
    assert gpu_check.matmul_params_per_layer(seven_b) * seven_b.layers == pytest.approx(6.525e9, rel=1e-3)
    flops = gpu_check.forward_flops(seven_b, batch=1, seq=512)
    assert flops == pytest.approx(2 * 6.525e9 * 512 + 28 * 4 * 512**2 * 3584, rel=1e-3)
    assert gpu_check.mfu(1e15, 2.0, 1e15) == 0.5
    with pytest.raises(ValueError):
        gpu_check.mfu(1.0, 0.0, 1.0)


def test_gpu_check_largest_fitting() -> None:
    def attempt(batch: int) -> None:
        if batch > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate")

    assert gpu_check.largest_fitting([1, 2, 4, 8, 16, 32], attempt) == 8
    with pytest.raises(ValueError):
        gpu_check.largest_fitting([1], lambda b: (_ for _ in ()).throw(ValueError("other")))


def test_gpu_check_model_helpers_on_cpu() -> None:
    import torch

    shape = gpu_check.QwenShape(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, vocab=100)
    model = gpu_check.build_model(shape, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    vectors = gpu_check.embed(model, ids, mask)
    assert vectors.shape == (3, 32) and torch.allclose(vectors.norm(dim=-1), torch.ones(3))
    # Bidirectional: the last token changes the first position's state, hence the pooled vector
    # of a row whose pooled token is not the changed one is unaffected only if causal.
    left = gpu_check.embed(model, ids[1:2, :6], mask[1:2, :6])
    assert torch.allclose(left[0], vectors[1], atol=1e-5)
    stats = gpu_check.agreement(vectors, vectors.half().float())
    assert stats["min_cos"] > 0.999 and stats["nonfinite_rows"] == 0
    table = gpu_check.format_table([("a", "b", "ok")])
    assert table.splitlines()[0].startswith("section")
