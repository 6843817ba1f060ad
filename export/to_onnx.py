"""torch → ONNX with the dynamo exporter, then save. Graph rewrites run on the saved file
afterwards (:mod:`export.passes`, :mod:`export.quantize`), so the 7B's weights are never held twice.

External data: a protobuf cannot exceed 2 GiB, and gte-Qwen2-7B's embedding table alone is
2.17 GB, so large models *must* keep weights in a side file. ``external_data="auto"`` does that
past 2 GB; tests force ``"always"`` so the side-file path is exercised on tiny models too.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["sentence_embedding", "embedding_norm"]
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB, with headroom for the graph
ExternalData = Literal["auto", "always", "never"]


def example_inputs(pad_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded example batch (left- and right-padded rows): no "mask is all ones" branch can be
    frozen into the graph, whatever the transformers version does when it sees no padding."""
    ids = torch.randint(0, vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids, mask


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(
    module: nn.Module,
    path: Path,
    *,
    pad_id: int,
    vocab_size: int,
    opset: int = 20,
    external_data: ExternalData = "auto",
) -> list[str]:
    """Export ``module`` to ``path`` and return the external data files written (relative names).

    The graph has inputs ``input_ids``/``attention_mask`` (int64, dynamic ``[batch, seq]``) and
    outputs ``sentence_embedding`` [batch, dim] and ``embedding_norm`` [batch] (float32).
    """
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    started = time.perf_counter()
    log.info("capturing the graph (torch.onnx.export, dynamo, opset %d)", opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter (e.g. "axis name batch will not be used")
        program = torch.onnx.export(
            module,
            example_inputs(pad_id, vocab_size),
            dynamo=True,
            opset_version=opset,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_shapes=dynamic,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    log.info("graph captured in %.1f s", time.perf_counter() - started)
    use_external = external_data == "always" or (
        external_data == "auto" and parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    )
    started = time.perf_counter()
    program.save(str(path), external_data=use_external)
    log.info(
        "saved %s%s in %.1f s",
        path.name,
        " + external data" if use_external else "",
        time.perf_counter() - started,
    )
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + ".") and p.is_file())
