"""Bad inputs end with a clear message, a distinct non-zero exit code and no bundle at --out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.cli import main


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["-q", *args])
    return code, capsys.readouterr().err


def _assert_clean(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", str(tmp_path / "nope"), "--out", str(out))
    assert code == 2 and "does not exist" in err
    _assert_clean(out)


def test_unknown_builtin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "--model", "builtin:gpt2", "--out", str(tmp_path / "out"))
    assert code == 2 and "builtin:all-MiniLM-L6-v2" in err


def test_unsupported_architecture(
    tiny_qwen2_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _copy(tiny_qwen2_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", str(ckpt), "--out", str(out))
    assert code == 3 and "'llama' is not supported" in err and "qwen2" in err and "bert" in err
    _assert_clean(out)


def test_truncated_safetensors(
    tiny_qwen2_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _copy(tiny_qwen2_checkpoint, tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", str(ckpt), "--out", str(out))
    assert code == 4 and "model.safetensors" in err and "truncated" in err
    _assert_clean(out)


def test_tokenizer_vocab_mismatch(
    tiny_qwen2_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _copy(tiny_qwen2_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = 32000  # e.g. a Llama-sized table with the Qwen2 tokenizer
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", str(ckpt), "--out", str(out))
    assert code == 5 and "151646 ids" in err and "32000" in err
    _assert_clean(out)


def test_unwritable_output(
    tiny_qwen2_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, "--model", str(tiny_qwen2_checkpoint), "--out", str(blocker / "bundle"))
    assert code == 6 and "cannot create" in err


def test_existing_output_is_not_replaced(
    tiny_qwen2_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _run(capsys, "--model", str(tiny_qwen2_checkpoint), "--out", str(out))
    assert code == 6 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_unreachable_hub_via_console_script(tmp_path: Path) -> None:
    """Through the real console script: a hub id on an offline machine fails fast and clearly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    script = Path(sys.executable).parent / "embed-export"
    proc = subprocess.run(
        [str(script), "--model", "Alibaba-NLP/gte-Qwen2-7B-instruct", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "cannot download 'Alibaba-NLP/gte-Qwen2-7B-instruct'" in proc.stderr and "--model" in proc.stderr
    _assert_clean(tmp_path / "out")
