"""In-process peer worker: runs *inside a peer's own virtual environment* (see bench/peers_env.py).

Why a separate process per peer: each library pins its own torch / transformers / optimum /
onnxruntime, which cannot share one environment with ours or with each other. The worker loads
the model once and then answers commands from the orchestrator, one JSON object per line on
stdin; replies are stdout lines starting with ``@@peer `` (libraries may print other lines).
Only the standard library, numpy and the peer's own package are imported here.

Commands: ``{"op": "info"}`` → version and truncation; ``{"op": "bulk", "save": path|null}`` →
seconds to embed the whole corpus (batch 32), vectors saved as .npy when asked;
``{"op": "single", "n": N}`` → per-call latencies of N one-query calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

BATCH = 32
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _sentence_transformers(model_dir: str, threads: int, onnx: bool) -> tuple[Callable[..., Any], dict]:
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    if onnx:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        kwargs = {"provider": "CPUExecutionProvider", "session_options": opts, "file_name": "onnx/model.onnx"}
        model = SentenceTransformer(
            model_dir, device="cpu", backend="onnx", model_kwargs=kwargs, local_files_only=True
        )
    else:
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        model = SentenceTransformer(model_dir, device="cpu", local_files_only=True)

    def embed(texts: list[str], batch: int) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=batch, normalize_embeddings=True))

    info = {"version": sentence_transformers.__version__, "max_length": int(model.max_seq_length)}
    return embed, info


def _fastembed(model_dir: str, threads: int) -> tuple[Callable[..., Any], dict]:
    import fastembed
    from fastembed import TextEmbedding

    model = TextEmbedding(MODEL_NAME, specific_model_path=model_dir, threads=threads)

    def embed(texts: list[str], batch: int) -> np.ndarray:
        return np.stack(list(model.embed(texts, batch_size=batch)))

    inner = getattr(model, "model", None)
    tok = getattr(inner, "tokenizer", None)
    trunc = getattr(tok, "truncation", None) or {}
    return embed, {"version": fastembed.__version__, "max_length": trunc.get("max_length")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=["st", "st-onnx", "fastembed"])
    parser.add_argument("model_dir")
    parser.add_argument("corpus", help="JSON file: {queries: [...], texts: [...]}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with open(args.corpus, encoding="utf-8") as f:
        corpus = json.load(f)
    if args.peer == "fastembed":
        embed, info = _fastembed(args.model_dir, args.threads)
    else:
        embed, info = _sentence_transformers(args.model_dir, args.threads, onnx=args.peer == "st-onnx")
    embed(corpus["queries"][:4], BATCH)  # warm-up: first-call allocations are not what we measure

    def reply(obj: dict) -> None:
        sys.stdout.write("@@peer " + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "info":
            reply(info)
        elif cmd["op"] == "bulk":
            start = time.perf_counter()
            vectors = embed(corpus["texts"], BATCH)
            took = time.perf_counter() - start
            if cmd.get("save"):
                np.save(cmd["save"], vectors.astype(np.float32))
            reply({"seconds": took})
        elif cmd["op"] == "single":
            queries = corpus["queries"]
            latencies = []
            for i in range(int(cmd["n"])):
                text = [queries[i % len(queries)]]
                start = time.perf_counter()
                embed(text, 1)
                latencies.append(time.perf_counter() - start)
            reply({"latencies": latencies})
        elif cmd["op"] == "quit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
