"""The generated code is reproducible from the proto, and the drift check can fail."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from service.pb.embedding.v1 import embedding_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # scripts/ is not an installed package; `make pytest` runs from ROOT
    sys.path.insert(0, str(ROOT))
from scripts import gen_proto  # noqa: E402


def test_committed_code_matches_proto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen_proto.check() == 0
    copy = tmp_path / "pb"
    shutil.copytree(gen_proto.OUT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "embedding" / "v1" / "embedding_pb2.py"
    target.write_text(target.read_text() + "# hand edit\n")
    (copy / "stale_pb2.py").write_text("")
    assert gen_proto.check(copy) == 1
    err = capsys.readouterr().err
    assert "differs: service/pb/embedding/v1/embedding_pb2.py" in err and "stale_pb2.py" in err


def test_public_names_are_stable() -> None:
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert service.full_name == "embedding.v1.EmbeddingService"
    stable = {"Embed", "EmbedStream", "Tokenize", "GetModelInfo", "ListModels", "Rerank"}
    assert stable <= set(service.methods_by_name)
    stream = service.methods_by_name["EmbedStream"]
    assert stream.client_streaming and stream.server_streaming
    fields = set(pb.EmbedRequest.DESCRIPTOR.fields_by_name)
    assert {"inputs", "input_type", "task", "instruction", "normalize", "dimensions", "truncation"} <= fields
    assert {"encoding", "request_id"} <= fields
    assert pb.EmbedRequest.DESCRIPTOR.fields_by_name["normalize"].has_presence
    assert set(pb.InputType.keys()) == {"INPUT_TYPE_UNSPECIFIED", "INPUT_TYPE_QUERY", "INPUT_TYPE_DOCUMENT"}
