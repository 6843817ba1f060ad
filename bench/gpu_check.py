"""GPU host check (issue 6): one command, < 8 minutes, a short table printed last.

    python3 bench/gpu_check.py [--layers 28] [--seq 512] [--budget-s 420]

Runs from the repository's own files with only torch, transformers, onnx, onnxscript and
onnxruntime installed (no package index, no pydantic): nothing here imports ``bundle`` or
``service``. Every section catches its own failure and reports it, so one missing provider or an
out-of-memory does not hide the other numbers.

Sections:
1. ``onnxruntime.get_available_providers()`` on this host.
2. The measured dense bf16 matmul rate (the MFU denominator: what this card really does).
3. PyTorch bf16 SDPA throughput of a random 7B-shaped gte-Qwen2 (bidirectional) at s=512 with
   the largest batch that fits, and its MFU against (2).
4. fp32 vs bf16 vs fp16 agreement of that model (cosine of pooled, normalised vectors).
5. If the CUDA / TensorRT EP is present: the same shapes through ONNX Runtime on a reduced-depth,
   full-width export (fused opset-23 graph), with parity against PyTorch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable (export.passes)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class QwenShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int = 151646

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SEVEN_B = QwenShape(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18944)


def matmul_params_per_layer(shape: QwenShape) -> int:
    """Weights that take part in GEMMs, per layer (q, k, v, o projections + gate, up, down)."""
    kv = shape.kv_heads * shape.head_dim
    return shape.hidden * (shape.hidden + 2 * kv + shape.hidden) + 3 * shape.hidden * shape.mlp


def forward_flops(shape: QwenShape, batch: int, seq: int) -> float:
    """FLOPs of one encoder forward: 2·params·tokens for the GEMMs + 4·b·s²·hidden per layer for
    QKᵀ and PV (bidirectional: the full square, nothing skipped). Embedding lookup is free."""
    tokens = batch * seq
    gemm = 2.0 * matmul_params_per_layer(shape) * tokens
    attention = 4.0 * batch * seq * seq * shape.hidden
    return shape.layers * (gemm + attention)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the measured peak."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError("seconds and peak must be positive")
    return flops / seconds / peak_flops


def largest_fitting(candidates: Sequence[int], attempt: Callable[[int], None]) -> int:
    """First (largest) candidate for which ``attempt`` does not raise an out-of-memory error."""
    for value in sorted(candidates, reverse=True):
        try:
            attempt(value)
            return value
        except Exception as exc:  # torch.cuda.OutOfMemoryError, or ORT/TRT allocation failures
            if "out of memory" not in str(exc).lower() and "OutOfMemory" not in type(exc).__name__:
                raise
            _free_cuda()
    raise RuntimeError(f"no batch size in {list(candidates)} fits")


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(shape: QwenShape, *, dtype: Any, device: str, seed: int = 0) -> Any:
    """A random bidirectional Qwen2 (``config.is_causal = False``) of ``shape``, SDPA attention."""
    import torch
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        use_cache=False,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )
    config.is_causal = False
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2Model(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def embed(model: Any, ids: Any, mask: Any) -> Any:
    """Last-token pooled, L2-normalised fp32 vectors (the service's graph contract)."""
    import torch

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state.float()
    index = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    return pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def agreement(reference: Any, other: Any) -> dict[str, float]:
    """Min / mean cosine of row vectors and the count of non-finite values in ``other``."""
    import torch

    ref, oth = reference.float(), other.float()
    finite = torch.isfinite(oth).all(dim=-1)
    cos = torch.nn.functional.cosine_similarity(ref, torch.nan_to_num(oth), dim=-1)
    return {
        "min_cos": float(cos.min()),
        "mean_cos": float(cos.mean()),
        "nonfinite_rows": float((~finite).sum()),
    }


def format_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """The closing table: section, result, status."""
    widths = [max(len(r[i]) for r in [("section", "result", "status"), *rows]) for i in range(3)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format("section", "result", "status"), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(out)


# --- sections (GPU) --------------------------------------------------------------------------
def _timed_cuda(fn: Callable[[], object], iters: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def section_providers() -> tuple[str, str]:
    import onnxruntime as ort

    return ", ".join(ort.get_available_providers()), f"onnxruntime {ort.__version__}"


def section_matmul(n: int = 8192) -> tuple[float, str]:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = _timed_cuda(lambda: a @ b, 20)
    rate = 2.0 * n**3 / seconds
    return rate, f"{rate / 1e12:.0f} TFLOP/s bf16 ({n}³ matmul, {torch.cuda.get_device_name()})"


def section_throughput(shape: QwenShape, seq: int, peak: float | None) -> tuple[Any, str]:
    import torch

    model = build_model(shape, dtype=torch.bfloat16, device="cuda")

    def attempt(batch: int) -> None:
        ids = torch.randint(0, shape.vocab, (batch, seq), device="cuda")
        embed(model, ids, torch.ones_like(ids))
        torch.cuda.synchronize()

    batch = largest_fitting([1, 2, 4, 8, 16, 32, 64, 128, 256], attempt)
    ids = torch.randint(0, shape.vocab, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    seconds = _timed_cuda(lambda: embed(model, ids, mask), 5)
    flops = forward_flops(shape, batch, seq)
    text = f"b={batch} s={seq}: {batch * seq / seconds:,.0f} tok/s, {flops / seconds / 1e12:.0f} TFLOP/s"
    if peak:
        text += f", MFU {mfu(flops, seconds, peak):.0%} (target ≥ 50%)"
    return model, text


def section_agreement(shape: QwenShape, bf16_model: Any) -> str:
    import torch

    del bf16_model
    _free_cuda()
    ids = torch.randint(0, shape.vocab, (4, 128), device="cuda", generator=None)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    mask[2, :30] = 0
    model = build_model(shape, dtype=torch.float32, device="cuda")
    ref = embed(model, ids, mask)
    cpu_state = {k: v.to("cpu") for k, v in model.state_dict().items()}
    parts = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for param in model.parameters():  # parameters only: RoPE's inv_freq buffer stays fp32
            param.data = param.data.to(dtype)
        model.load_state_dict(cpu_state)  # cast from the same fp32 weights each time
        stats = agreement(ref, embed(model, ids, mask))
        parts.append(f"{name} min cos {stats['min_cos']:.5f} (non-finite rows {stats['nonfinite_rows']:.0f})")
    del model, cpu_state
    _free_cuda()
    return "vs fp32: " + "; ".join(parts)


def section_ort(shape: QwenShape, seq: int, layers: int) -> str:
    import onnxruntime as ort
    import torch

    wanted = [
        p
        for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        if p in ort.get_available_providers()
    ]
    if not wanted:
        return "skipped: no CUDA/TensorRT EP in this onnxruntime build"
    reduced = QwenShape(shape.hidden, layers, shape.heads, shape.kv_heads, shape.mlp, shape.vocab)
    model = build_model(reduced, dtype=torch.float16, device="cuda")

    class Wrapper(torch.nn.Module):
        def __init__(self, backbone: Any) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return embed(self.backbone, input_ids, attention_mask)

    from export.passes import apply_graph_variant

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        ids = torch.randint(0, reduced.vocab, (2, 16), device="cuda")
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
        program = torch.onnx.export(
            Wrapper(model),
            (ids, mask),
            dynamo=True,
            opset_version=23,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
        )
        program.save(str(path), external_data=True)
        apply_graph_variant(path, "fused")
        for provider in wanted:
            sess = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
            batch = 8
            ids = torch.randint(0, reduced.vocab, (batch, seq))
            feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
            out = sess.run(None, feed)[0]
            start = time.perf_counter()
            for _ in range(5):
                sess.run(None, feed)
            seconds = (time.perf_counter() - start) / 5
            ref = embed(model, ids.cuda(), torch.ones_like(ids).cuda()).cpu()
            cos = agreement(ref, torch.from_numpy(out))["min_cos"]
            results.append(
                f"{provider.replace('ExecutionProvider', '')}: {layers}-layer fp16 b={batch} s={seq} "
                f"{batch * seq / seconds:,.0f} tok/s, cos vs torch {cos:.5f}, "
                f"in use {sess.get_providers()[0]}"
            )
    return "; ".join(results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=SEVEN_B.layers, help="depth of the 7B-shaped model")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--ort-layers", type=int, default=2, help="depth of the ORT export (full width)")
    args = parser.parse_args(argv)
    shape = QwenShape(SEVEN_B.hidden, args.layers, SEVEN_B.heads, SEVEN_B.kv_heads, SEVEN_B.mlp)
    rows: list[tuple[str, str, str]] = []
    started = time.perf_counter()

    def attempt(name: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        try:
            text, status = fn(), "ok"
        except Exception as exc:  # report and continue: every section is independent
            traceback.print_exc()
            text, status = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}",
                "FAILED",
            )
        print(f"[{name}] {text} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append((name, text, status))

    def providers() -> str:
        names, version = section_providers()
        return f"{names} ({version})"

    attempt("ort providers", providers)
    peak: list[float] = []
    model_box: list[Any] = []
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing entirely
        has_cuda = False
    if not has_cuda:
        rows.append(("torch cuda", "torch.cuda.is_available() is False", "SKIPPED"))
    else:

        def matmul() -> str:
            rate, text = section_matmul()
            peak.append(rate)
            return text

        def throughput() -> str:
            model, text = section_throughput(shape, args.seq, peak[0] if peak else None)
            model_box.append(model)
            return text

        attempt("bf16 matmul peak", matmul)
        attempt(f"7B-shape bf16 SDPA ({shape.layers} layers)", throughput)
        attempt("fp16/bf16 vs fp32", lambda: section_agreement(shape, model_box.pop() if model_box else None))
        attempt("ORT CUDA/TRT EP", lambda: section_ort(shape, args.seq, args.ort_layers))
    rows.append(("total", f"{time.perf_counter() - started:.0f} s (budget 480 s)", "ok"))
    print()
    print(format_table(rows))
    return 0 if all(r[2] != "FAILED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
