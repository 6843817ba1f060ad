"""One typed settings object for the server: CLI flags > ``EMBED_*`` environment > defaults.

Read once, at the entry point; everything else receives a ``Settings`` instance (tests build
one directly). This module is the only reader of the environment (ruff's TID251 enforces it),
and the README's settings table is generated from the field descriptions below
(``python -m service.settings --markdown``), so the two cannot drift.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.domain import Truncation

ENV_PREFIX = "EMBED_"

Provider = Literal["cpu", "cuda", "tensorrt"]
# Settings that hold a list: the flag repeats, the environment variable separates with commas.
LIST_FIELDS = ("model_dir", "model_alias")


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model-dir`` entry: the bundle directory and the name clients use (None: manifest id)."""

    name: str | None
    directory: Path


def _split_pair(entry: str) -> tuple[str, str] | None:
    """``NAME=VALUE`` → (NAME, VALUE); None when there is no ``=`` or either side is empty."""
    name, sep, value = entry.partition("=")
    if not sep or not name.strip() or not value.strip():
        return None
    return name.strip(), value.strip()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- model -------------------------------------------------------------------------------
    # NoDecode: a list setting arrives as one comma-separated string, never as JSON.
    model_dir: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("bundles/all-MiniLM-L6-v2",),
        min_length=1,
        description="Model bundle directory written by `embed-export` (manifest.json inside). Repeat "
        "the flag (environment: comma-separated) to serve several; `NAME=PATH` names one; the first is "
        "the default.",
    )
    model_name: str | None = Field(
        default=None,
        description="Name clients use for the first model (bare path); defaults to the manifest's model_id.",
    )
    model_alias: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="`ALIAS=MODEL`: also answer to ALIAS (e.g. text-embedding-3-small) with MODEL. "
        "Repeat the flag (environment: comma-separated); an unknown name is refused, never mapped.",
    )
    max_total_memory_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Predicted memory of all models together (weights + one largest batch each); start-up "
        "refuses beyond it. Set: models load in parallel; unset: no check, one after another.",
    )
    allow_dimensions: bool = Field(
        default=False,
        description="Allow `dimensions` (truncate, renormalise); off as gte-Qwen2 is not Matryoshka-trained.",
    )

    # --- network -----------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="gRPC bind address (0.0.0.0 in containers).")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    http_host: str = Field(default="127.0.0.1", description="HTTP (OpenAI-compatible) bind address.")
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="HTTP port for /v1/embeddings, /health, /metrics; unset disables.",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Optional separate Prometheus port (also served on HTTP)."
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        description="Max gRPC message size both ways; stream responses are split to stay under it.",
    )
    max_connection_age_s: float | None = Field(
        default=None,
        gt=0,
        description="Close gRPC connections after this age so round_robin clients rebalance onto new pods.",
    )
    http_keepalive_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="HTTP: close a connection that sends no full request head this long after opening or its "
        "last answer (idle keep-alive, slow headers); keep it above a load balancer's idle timeout.",
    )
    http_body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="HTTP: a body not complete this long after its headers gets 408; the connection closes.",
    )
    http_allow_token_ids: bool = Field(
        default=False,
        description="Accept token ids as HTTP `input` (this model's vocabulary, not OpenAI's tiktoken ids).",
    )
    max_connection_idle_s: float | None = Field(
        default=300.0,
        gt=0,
        description="Close a gRPC connection that carried no call for this long (GOAWAY; clients reconnect).",
    )
    keepalive_time_s: float = Field(
        default=60.0,
        gt=0,
        description="Ping a gRPC client after this long without traffic, to find half-open connections.",
    )
    keepalive_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="Close a gRPC connection whose keepalive ping is not answered in this long.",
    )
    min_client_ping_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="Min gap between client pings; 2 faster pings get GOAWAY (gRPC keepalive enforcement).",
    )
    grace_period_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM: NOT_SERVING at once, finish accepted work within this."
    )

    # --- limits and batching -----------------------------------------------------------------
    max_inputs_per_request: int = Field(default=256, ge=1, description="Max texts in one request.")
    max_input_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Cap on tokens per input; defaults to the manifest's max_input_tokens.",
    )
    default_truncation: Truncation = Field(
        default="none",
        description="Truncation when the request says SERVER_DEFAULT: none (error), end or start.",
    )
    max_batch_tokens: int = Field(
        default=16384, ge=1, description="Token budget of one batch, counted as paid: batch × longest."
    )
    max_batch_size: int = Field(default=64, ge=1, description="Max inputs in one batch.")
    max_batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description="While the runtime is busy, how long queued work waits for company (idle: runs at once).",
    )
    max_padding_ratio: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="Max share of padding in a batch; inputs of other lengths wait for company instead.",
    )
    max_batch_memory_bytes: int = Field(
        default=8 * 1024**3,
        ge=1024**2,
        description="Predicted activation memory of one batch; larger batches split, longer inputs refused.",
    )
    watchdog_stall_s: float = Field(
        default=60.0,
        gt=0,
        description="Health turns NOT_SERVING (liveness fails) when a runtime call runs longer than "
        "max(this, watchdog_factor × its predicted time), or queued work starts no call for this long.",
    )
    watchdog_factor: float = Field(
        default=20.0, ge=1, description="How far past its predicted time a runtime call may run (see above)."
    )
    max_queue_tokens: int = Field(
        default=262144, ge=1, description="Queued tokens beyond which requests get RESOURCE_EXHAUSTED."
    )
    cache_bytes: int = Field(
        default=64 * 1024**2,
        ge=0,
        description="Result cache (LRU of vectors by exact model input ids) size in bytes; 0 disables it.",
    )

    # --- runtime -----------------------------------------------------------------------------
    provider: Provider = Field(
        default="cpu", description="ONNX Runtime execution provider: cpu, cuda, tensorrt."
    )
    provider_fallback: Literal["fail", "warn"] = Field(
        default="fail", description="When ORT silently falls back from the wanted provider: fail or warn."
    )
    device_id: int = Field(default=0, ge=0, description="GPU ordinal for cuda / tensorrt.")
    intra_op_threads: int = Field(default=0, ge=0, description="ORT intra-op threads (0: ORT decides).")
    inter_op_threads: int = Field(default=0, ge=0, description="ORT inter-op threads (0: ORT decides).")
    cuda_mem_limit_bytes: int | None = Field(
        default=None, ge=0, description="CUDA EP memory arena limit; unset: no limit."
    )
    cuda_io_binding: bool = Field(default=True, description="Bind inputs/outputs on the device (CUDA/TRT).")
    trt_cache_dir: Path = Field(
        default=Path("/tmp/embed-trt-cache"), description="TensorRT engine + timing cache directory."
    )
    trt_fp16: bool = Field(default=False, description="TensorRT: allow fp16 kernels.")
    trt_bf16: bool = Field(
        default=False, description="TensorRT: allow bf16 kernels (preferred for gte-Qwen2)."
    )
    trt_int8: bool = Field(default=False, description="TensorRT: allow int8 kernels (QDQ graphs).")
    trt_layer_norm_fp32_fallback: bool = Field(
        default=True, description="TensorRT: keep normalisation layers in fp32 (fp16 overflow guard)."
    )
    trt_max_workspace_bytes: int = Field(default=4 * 1024**3, ge=0, description="TensorRT builder workspace.")
    self_test: bool = Field(default=True, description="Check the bundle's golden vectors at start-up.")

    # --- security ----------------------------------------------------------------------------
    api_keys_file: Path | None = Field(
        default=None,
        description="File with one API key per line (optionally name= and rpm/tpm/concurrency "
        "limits); unset: no authentication (warned).",
    )
    tls_cert_file: Path | None = Field(
        default=None, description="Server certificate (PEM) for gRPC and HTTP."
    )
    tls_key_file: Path | None = Field(default=None, description="Server private key (PEM).")
    tls_client_ca_file: Path | None = Field(
        default=None, description="CA bundle for client certificates: enables mTLS (client cert required)."
    )
    credentials_poll_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="How often to check the keys and TLS files for changes (reloaded without a "
        "restart; also on SIGHUP); 0: only on SIGHUP.",
    )

    # --- logging -----------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_format: Literal["json", "text"] = Field(
        default="json", description="Structured JSON or plain text logs."
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC collector (e.g. http://otel-collector:4317) for request traces; unset: "
        "tracing off. Needs the `otel` extra.",
    )

    @field_validator(*LIST_FIELDS, mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """One string (or path) is a comma-separated list, so a single ``EMBED_MODEL_DIR`` stays valid."""
        items = [value] if isinstance(value, str | Path) else value
        if not isinstance(items, list | tuple):
            return value
        return tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())

    def models(self) -> tuple[ModelSpec, ...]:
        """The served bundles in order (the first is the default model)."""
        out = []
        for index, entry in enumerate(self.model_dir):
            pair = _split_pair(entry)
            name, directory = pair if pair is not None else (None, entry)
            if index == 0 and name is None:
                name = self.model_name
            out.append(ModelSpec(name, Path(directory)))
        return tuple(out)

    @property
    def bundle_dir(self) -> Path:
        """The default (first) model's bundle directory."""
        return self.models()[0].directory

    def aliases(self) -> dict[str, str]:
        """``--model-alias`` as alias → served model name."""
        return dict(pair for pair in map(_split_pair, self.model_alias) if pair is not None)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        bad = [entry for entry in self.model_alias if _split_pair(entry) is None]
        if bad:
            raise ValueError(f"model_alias must be ALIAS=MODEL (got {bad[0]!r})")
        if self.model_name and _split_pair(self.model_dir[0]) is not None:
            raise ValueError("the first model is named twice: by model_name and by NAME=PATH in model_dir")
        names = [spec.name for spec in self.models() if spec.name]
        if len(set(names)) < len(names):
            raise ValueError(f"model names must differ: {', '.join(names)}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        if self.trt_fp16 and self.trt_bf16:
            raise ValueError("choose one of trt_fp16 and trt_bf16")
        return self


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _base_type(annotation: Any) -> Any:
    """Strip Optional[...] so a CLI string can be parsed by pydantic into the real type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def build_parser(prog: str = "embed-serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a model bundle over gRPC (and optionally OpenAI-compatible HTTP)."
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} [env {env_name(name)}]"
        base = _base_type(info.annotation)
        if _is_bool(base):
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        if name in LIST_FIELDS:
            parser.add_argument(
                flag, dest=name, default=None, action="append", help=help_text + " (repeatable)"
            )
            continue
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
        parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse CLI flags over ``EMBED_*`` environment variables; the only place either is read."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    env = dict(os.environ if environ is None else environ)
    unknown = sorted(
        k
        for k in env
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() not in Settings.model_fields
    )
    if unknown:
        raise ValueError(f"unknown setting(s) in the environment: {', '.join(unknown)}")
    from_env = {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    # pydantic validates strings from both sources the same way; CLI wins over the environment.
    return Settings.model_validate({**from_env, **overrides}, context={"source": "cli+env"})


def markdown_table() -> str:
    rows = ["| flag | environment | default | description |", "| --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        default = info.default
        if isinstance(default, tuple):
            default = ",".join(default) or None
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `--{name.replace('_', '-')}` | `{env_name(name)}` | {shown} | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table())
