"""Several bundles in one server: selection by name or alias, NOT_FOUND / 404 for others, per-model
health, ListModels, the memory check at start-up, and clients built from the previous proto."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svc_harness import settings_for
from svc_toy import build_toy_bundle

from service.edge import Edge
from service.errors import StartupError
from service.models import ModelRegistry
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.server import build_server
from service.settings import ModelSpec, Settings, load_settings

OLD_PROTO = Path(__file__).parent / "proto_before_models" / "embedding.proto"


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    # Same manifest id, different limits and prompts: the names and answers tell them apart.
    return build_toy_bundle(root / "a"), build_toy_bundle(
        root / "b", max_input_tokens=24, template=None, golden=False
    )


@dataclass
class Running:
    models: ModelRegistry
    stub: pb_grpc.EmbeddingServiceStub
    health: health_pb2_grpc.HealthStub
    port: int
    http_url: str


@asynccontextmanager
async def serving_models(model_dir: list[str], **overrides: Any) -> AsyncIterator[Running]:
    """gRPC + HTTP on port 0 over a registry built as ``serve`` builds it."""
    settings = Settings(
        **{**settings_for(Path("unused")).model_dump(), "model_dir": model_dir, "http_port": 0, **overrides}
    )
    edge = Edge.from_settings(settings)
    models = edge.registry()
    edge.observe_core(models)
    server, port = build_server(settings, models, interceptors=edge.grpc_interceptors())
    await server.start()
    http = await edge.start_http(models)
    assert http is not None and http.port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await models.start()
        yield Running(
            models,
            pb_grpc.EmbeddingServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            port,
            f"http://127.0.0.1:{http.port}",
        )
    finally:
        await channel.close()
        await http.stop()
        await server.stop(0)
        await models.close()


def test_model_dir_accepts_one_path_a_list_and_names() -> None:
    assert load_settings([], {"EMBED_MODEL_DIR": "/m/a"}).models() == (ModelSpec(None, Path("/m/a")),)
    listed = load_settings([], {"EMBED_MODEL_DIR": "/m/a, big=/m/b"}).models()
    assert listed == (ModelSpec(None, Path("/m/a")), ModelSpec("big", Path("/m/b")))
    flags = ["--model-dir", "first=/m/a", "--model-dir", "/m/b", "--model-alias", "ada=first"]
    settings = load_settings(flags, {})
    assert settings.models() == (ModelSpec("first", Path("/m/a")), ModelSpec(None, Path("/m/b")))
    assert settings.aliases() == {"ada": "first"}
    assert load_settings(["--model-name", "x"], {"EMBED_MODEL_DIR": "/m/a"}).models()[0].name == "x"
    with pytest.raises(ValueError, match="ALIAS=MODEL"):
        load_settings(["--model-alias", "ada"], {})
    with pytest.raises(ValueError, match="model names must differ"):
        load_settings(["--model-dir", "a=/x", "--model-dir", "a=/y"], {})


@pytest.mark.asyncio
async def test_requests_pick_their_model_and_unknown_names_are_not_found(
    two_bundles: tuple[Path, Path],
) -> None:
    a, b = two_bundles
    async with serving_models([f"a={a}", f"b={b}"], model_alias=("text-embedding-3-small=b",)) as run:
        default = await run.stub.Embed(pb.EmbedRequest(inputs=["hello world"]))
        second = await run.stub.Embed(pb.EmbedRequest(inputs=["hello world"], model="b"))
        aliased = await run.stub.Embed(
            pb.EmbedRequest(inputs=["hello world"], model="text-embedding-3-small")
        )
        assert (default.model, second.model, aliased.model) == ("a", "b", "b")
        assert (await run.stub.GetModelInfo(pb.GetModelInfoRequest())).max_input_tokens == 32
        assert (await run.stub.GetModelInfo(pb.GetModelInfoRequest(model="b"))).max_input_tokens == 24
        # b's bundle has no tasks: the task a knows is refused once the request names b.
        query = pb.TokenizeRequest(inputs=["red fish"], input_type=pb.INPUT_TYPE_QUERY, task="search")
        with_instruction = await run.stub.Tokenize(query)
        assert with_instruction.model == "a" and with_instruction.total_tokens > 4
        query.model = "b"
        with pytest.raises(grpc.aio.AioRpcError) as unknown_task:
            await run.stub.Tokenize(query)
        assert unknown_task.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await run.stub.Tokenize(pb.TokenizeRequest(inputs=["red fish"], model="b"))).model == "b"

        for call, request in (
            (run.stub.Embed, pb.EmbedRequest(inputs=["x"], model="text-embedding-ada-002")),
            (run.stub.Tokenize, pb.TokenizeRequest(inputs=["x"], model="nope")),
            (run.stub.GetModelInfo, pb.GetModelInfoRequest(model="nope")),
            (run.stub.Embed, pb.EmbedRequest(inputs=["x"], model="m" * 100_000)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(request)  # type: ignore[operator]
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert "served: a, b; aliases: text-embedding-3-small -> b" in (refused.value.details() or "")

        listed = await run.stub.ListModels(pb.ListModelsRequest())
        assert [m.model for m in listed.models] == ["a", "b"] and listed.default_model == "a"
        assert [(x.alias, x.model) for x in listed.aliases] == [("text-embedding-3-small", "b")]

        for service in ("", "embedding.v1.EmbeddingService", "embedding.v1.EmbeddingService/a",
                        "embedding.v1.EmbeddingService/b"):  # fmt: skip
            answer = await run.health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{run.http_url}/v1/models") as resp:
                assert [card["id"] for card in (await resp.json())["data"]] == ["a", "b"]
            async with http.get(f"{run.http_url}/v1/models/b") as resp:
                assert resp.status == 200 and (await resp.json())["id"] == "b"
            body = {"input": ["hello world"], "model": "text-embedding-ada-002"}
            async with http.post(f"{run.http_url}/v1/embeddings", json=body) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
                assert "served: a, b" in error["message"]
            body["model"] = "text-embedding-3-small"
            async with http.post(f"{run.http_url}/v1/embeddings", json=body) as resp:
                assert resp.status == 200 and (await resp.json())["model"] == "b"
            del body["model"]
            async with http.post(f"{run.http_url}/v1/embeddings", json=body) as resp:
                assert resp.status == 200 and (await resp.json())["model"] == "a"
            async with http.get(f"{run.http_url}/metrics") as resp:
                metrics = await resp.text()
        for line in (
            'embed_model_ready{model="a"} 1.0',
            'embed_model_ready{model="b"} 1.0',
            'embed_model_requests_total{model="a"} 2.0',  # gRPC default + HTTP without `model`
            'embed_model_requests_total{model="b"} 3.0',  # gRPC b, gRPC alias, HTTP alias
            'embed_model_queue_tokens{model="b"} 0.0',
            "embed_ready 1.0",
        ):
            assert line in metrics, line


@pytest.mark.asyncio
async def test_each_model_has_its_own_batcher(two_bundles: tuple[Path, Path]) -> None:
    a, b = two_bundles
    async with serving_models([f"a={a}", f"b={b}"]) as run:
        first, second = run.models.cores
        assert first.batcher is not second.batcher
        seen: dict[str, list[str]] = {"a": [], "b": []}
        first.add_result_listener(lambda result: seen["a"].append(result.model))
        second.add_result_listener(lambda result: seen["b"].append(result.model))
        await run.stub.Embed(pb.EmbedRequest(inputs=["one", "two"], model="b"))
        await run.stub.Embed(pb.EmbedRequest(inputs=["three"]))
        assert seen == {"a": ["a"], "b": ["b"]}


@pytest.mark.asyncio
async def test_start_up_refuses_models_that_do_not_fit_together(two_bundles: tuple[Path, Path]) -> None:
    a, b = two_bundles
    settings = settings_for(a).model_copy(
        update={"model_dir": (f"a={a}", f"b={b}"), "max_total_memory_bytes": 1}
    )
    models = ModelRegistry.from_settings(settings)
    with pytest.raises(StartupError, match=r"the models need .* together \(a .* GiB, b .* GiB\)"):
        await models.start()
    assert models.state == "failed" and not models.serving
    await models.close()


@pytest.mark.asyncio
async def test_with_a_memory_limit_models_load_in_parallel(two_bundles: tuple[Path, Path]) -> None:
    a, b = two_bundles
    async with serving_models([f"a={a}", f"b={b}"], max_total_memory_bytes=64 * 1024**3) as run:
        assert [c.state for c in run.models.cores] == ["ready", "ready"]


@pytest.mark.asyncio
async def test_start_up_refuses_an_alias_to_nothing_and_duplicate_names(
    two_bundles: tuple[Path, Path],
) -> None:
    a, b = two_bundles
    for dirs, alias, match in (
        ((f"a={a}", str(b)), ("x=zzz",), "no served model is named 'zzz'"),
        ((str(a), str(b)), (), "are both named 'toy-mean'"),
    ):
        settings = settings_for(a).model_copy(update={"model_dir": dirs, "model_alias": alias})
        models = ModelRegistry.from_settings(settings)
        with pytest.raises(StartupError, match=match):
            await models.start()
        assert models.state == "failed"
        await models.close()


_OLD_CLIENT = """
import json, sys
import grpc
sys.path.insert(0, sys.argv[1])
from embedding.v1 import embedding_pb2 as pb, embedding_pb2_grpc as pb_grpc
assert "model" not in pb.EmbedRequest.DESCRIPTOR.fields_by_name  # really the previous proto
with grpc.insecure_channel(sys.argv[2]) as channel:
    stub = pb_grpc.EmbeddingServiceStub(channel)
    embedded = stub.Embed(pb.EmbedRequest(inputs=["hello world"]), timeout=60)
    tokenized = stub.Tokenize(pb.TokenizeRequest(inputs=["hello world"]), timeout=60)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
    streamed = list(stub.EmbedStream(iter([pb.EmbedRequest(inputs=["a", "b"])]), timeout=60))
print(json.dumps({
    "model": embedded.model, "dims": len(embedded.embeddings[0].values),
    "tokens": tokenized.total_tokens, "info": info.model, "max": info.max_input_tokens,
    "streamed": sum(len(r.embeddings) for r in streamed),
}))
"""


@pytest.mark.asyncio
async def test_clients_built_from_the_previous_proto_get_the_default_model(
    two_bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    from grpc_tools import protoc  # the proto compiler `make proto` uses (dev extra)

    a, b = two_bundles
    out = tmp_path / "old_stubs"
    out.mkdir()
    source = tmp_path / "proto" / "embedding" / "v1"
    source.mkdir(parents=True)
    (source / "embedding.proto").write_text(OLD_PROTO.read_text())
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{tmp_path / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
    ]
    assert protoc.main([*args, "embedding/v1/embedding.proto"]) == 0
    async with serving_models([str(b), f"a={a}"]) as run:
        # Its own process: the old and new descriptors cannot share one protobuf pool.
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _OLD_CLIENT, str(out), f"127.0.0.1:{run.port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(child.communicate(), 240)
        assert child.returncode == 0, stderr.decode()
    answer = json.loads(stdout)
    assert answer == {
        "model": "toy-mean",
        "dims": 16,
        "tokens": 4,
        "info": "toy-mean",
        "max": 24,
        "streamed": 2,
    }


def test_embed_serve_with_two_model_dirs(two_bundles: tuple[Path, Path]) -> None:
    """The console script as operators start it: a list in EMBED_MODEL_DIR, an alias flag."""
    from test_svc_e2e import embed_serve, free_port, wait_serving

    a, b = two_bundles
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBED_")}
    env["EMBED_MODEL_DIR"] = f"a={a},b={b}"
    cmd = [*embed_serve(), "--port", str(port), "--model-alias", "ada=b", "--log-format", "text"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_serving(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
            assert [m.model for m in listed.models] == ["a", "b"]
            assert stub.Embed(pb.EmbedRequest(inputs=["x"], model="ada"), timeout=30).model == "b"
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest(service="embedding.v1.EmbeddingService/b")
            assert check(request, timeout=30).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)

    # Too little memory for both: exit 2, naming each model's share.
    refused = subprocess.run(
        [*embed_serve(), "--port", str(free_port()), "--max-total-memory-bytes", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "the models need" in refused.stderr and "(a " in refused.stderr and ", b " in refused.stderr
