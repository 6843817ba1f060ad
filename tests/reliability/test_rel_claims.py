"""The manifest's checkable claims are checked at start-up (issue 12 item 9).

An edited manifest (hashes cover the other files, not the manifest itself) used to start the
server, which then returned vectors contradicting GetModelInfo or 500s from ONNX Runtime. Each
case below edits one claim and expects start-up to refuse, naming the field; the last ones show
the run-time side: with honest claims a too-high token id or too-long input is a 4xx.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from rel_harness import grpc_channel, live_server, refused_start, settings_for, stubs
from rel_toy import DIM, MAX_TOKENS, VOCAB, build_toy_bundle, edit_manifest

from service.core import EmbeddingCore
from service.errors import StartupError
from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio


def _set(path: str, value: object) -> Callable[[dict], None]:  # type: ignore[type-arg]
    def edit(raw: dict) -> None:  # type: ignore[type-arg]
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value

    return edit


@pytest.fixture(scope="module")
def positional_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy whose graph has a learned position table of MAX_TOKENS rows (like BERT's)."""
    return build_toy_bundle(tmp_path_factory.mktemp("claims") / "pos", positions=MAX_TOKENS)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


@pytest.mark.parametrize(
    ("field", "value", "fragments"),
    [
        ("dim", 768, ["dim=768", "model.onnx"]),
        ("max_input_tokens", 4 * MAX_TOKENS, ["max_input_tokens=128", "--max-input-tokens"]),
        ("tokenizer.vocab_size", VOCAB + 100, ["tokenizer.vocab_size", f"{VOCAB} rows"]),
        ("tokenizer.vocab_size", 10, ["tokenizer.vocab_size=10", "tokenizer.json", "largest token id"]),
        ("tokenizer.pad_id", VOCAB + 5, ["tokenizer.pad_id", f"{VOCAB + 5}"]),
    ],
    ids=["dim", "positions", "vocab-past-table", "vocab-below-tokenizer", "pad-id"],
)
async def test_lying_manifest_is_refused(
    positional_bundle: Path, tmp_path: Path, field: str, value: int, fragments: list[str]
) -> None:
    bundle = _copy(positional_bundle, tmp_path)
    edit_manifest(bundle, _set(field, value))
    await refused_start(settings_for(bundle), fragments)


async def test_vocab_past_table_is_caught_by_the_probe_when_the_file_says_nothing(
    positional_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs whose table the file reader cannot find are still checked by the probe run."""
    from service.onnx_shapes import GraphFacts

    monkeypatch.setattr(GraphFacts, "embedding_rows", lambda self, name="input_ids": None)
    bundle = _copy(positional_bundle, tmp_path)
    edit_manifest(bundle, _set("tokenizer.vocab_size", VOCAB + 100))
    core = EmbeddingCore(settings_for(bundle))
    with pytest.raises(StartupError, match=rf"tokenizer.vocab_size={VOCAB + 100}: model.onnx cannot embed"):
        await core.start()
    await core.close()


async def test_operator_limit_within_the_table_starts(positional_bundle: Path, tmp_path: Path) -> None:
    """The check is on the *served* limit: --max-input-tokens within the table is the fix."""
    bundle = _copy(positional_bundle, tmp_path)
    edit_manifest(bundle, _set("max_input_tokens", 4 * MAX_TOKENS))
    async with live_server(bundle, max_input_tokens=MAX_TOKENS) as live:
        assert live.core.model_info().max_input_tokens == MAX_TOKENS
        assert live.core.model_info().dimensions == DIM


async def test_run_time_ids_and_lengths_are_4xx(positional_bundle: Path) -> None:
    too_long = " ".join(["w1"] * (MAX_TOKENS + 5))
    async with live_server(positional_bundle) as live:
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            for request in (
                pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[VOCAB])]),
                pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[2**31 - 1])]),
                pb.EmbedRequest(inputs=[too_long], truncation=pb.TRUNCATION_NONE),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Embed(request, timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            reply = await stub.Embed(
                pb.EmbedRequest(inputs=[too_long], truncation=pb.TRUNCATION_END), timeout=30
            )
            assert len(reply.embeddings) == 1
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{live.http_url}/v1/embeddings", json={"model": live.core.model_name, "input": [[VOCAB + 1]]}
            ) as resp,
        ):
            assert resp.status == 400, await resp.text()
