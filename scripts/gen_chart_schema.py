"""Write helm/embedding-service/values.schema.json; ``--check`` fails when the file is stale.

The ``config`` section is generated from ``service.settings.Settings`` (types, enums, bounds,
descriptions), so the chart accepts exactly the server's settings and a typo or a wrong type is
rejected by ``helm install`` with the field's name, before anything reaches the cluster. The
settings the chart derives from other values (paths of mounted volumes and secrets, the bind
address) are listed in ``CHART_MANAGED`` and are rejected under ``config``.

    python -m scripts.gen_chart_schema          # rewrite
    python -m scripts.gen_chart_schema --check  # exit 1 when out of date
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types

from service.settings import Settings

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "helm" / "embedding-service" / "values.schema.json"

# Settings the chart sets itself, and from which values. Not accepted under `config`.
CHART_MANAGED: dict[str, str] = {
    "host": "always 0.0.0.0 (bind on the pod IP)",
    "model_dir": "model.mountPath + model.bundleName (derived from model.export.*), and extraModels",
    "trt_cache_dir": "trtCache.mountPath + gpuType + tensorrtVersion + bundle (provider=tensorrt)",
    "api_keys_file": "auth.* (a Secret mounted read-only)",
    "tls_cert_file": "tls.existingSecret / tls.certKey",
    "tls_key_file": "tls.existingSecret / tls.keyKey",
    "tls_client_ca_file": "tls.clientCA.*",
}

# Where the chart is stricter than the server: port 0 ("pick a free port") cannot be probed or
# put behind a Service.
CHART_MINIMUM: dict[str, int] = {"port": 1, "http_port": 1, "metrics_port": 1}


def _setting_schema(name: str) -> dict[str, Any]:
    info = Settings.model_fields[name]
    annotation: Any = info.annotation
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"{name}: unsupported type {annotation}")
        annotation = args[0]
    out: dict[str, Any] = {"description": info.description or ""}
    if typing.get_origin(annotation) is tuple:  # a list setting: the chart joins it with commas
        out["type"] = "array"
        out["items"] = {"type": "string", "minLength": 1, "pattern": "^[^,]+$"}
    elif typing.get_origin(annotation) is Literal:
        choices = list(typing.get_args(annotation))
        out["type"] = "string"
        out["enum"] = [*choices, None] if nullable else choices
    else:
        json_type = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "string"}.get(
            annotation
        )
        if json_type is None:
            raise TypeError(f"{name}: unsupported type {annotation}")
        out["type"] = json_type
    if nullable:
        out["type"] = [out["type"], "null"]
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            out["minimum"] = meta.ge
        elif isinstance(meta, annotated_types.Gt):
            out["exclusiveMinimum"] = meta.gt
        elif isinstance(meta, annotated_types.Le):
            out["maximum"] = meta.le
        elif isinstance(meta, annotated_types.Lt):
            out["exclusiveMaximum"] = meta.lt
    if name in CHART_MINIMUM:
        out["minimum"] = max(out.get("minimum", CHART_MINIMUM[name]), CHART_MINIMUM[name])
    return out


def config_schema() -> dict[str, Any]:
    exposed = [n for n in Settings.model_fields if n not in CHART_MANAGED]
    return {
        "type": "object",
        "description": "Server settings (service/settings.py): key = field, env EMBED_<KEY>. Chart-managed, "
        "not accepted here: " + "; ".join(f"{k} ({v})" for k, v in CHART_MANAGED.items()),
        "additionalProperties": False,
        "properties": {n: _setting_schema(n) for n in exposed},
    }


# ------------------------------------------------------------------------------------------------
# The rest of the values, written by hand. Small helpers keep it readable.


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT0 = {"type": "integer", "minimum": 0}
INT1 = {"type": "integer", "minimum": 1}
MAP = {"type": "object"}
LIST = {"type": "array"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {
    "type": "string",
    "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P)?$",
    "description": "Kubernetes quantity, e.g. 20Gi",
}
# A served model's name: it goes into EMBED_MODEL_DIR as NAME=PATH, comma-separated.
MODEL_NAME = {"type": "string", "pattern": "^[^,=\\s]*$"}
PULL_POLICY = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}
ACCESS_MODES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "string",
        "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"],
    },
}
ENV_LIST = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name"],
        # EMBED_* names are rejected by the chart (with a message naming `config`).
        "properties": {"name": {"type": "string", "minLength": 1}},
    },
}
PROBE = _obj(
    {
        "enabled": BOOL,
        "service": STR,
        "periodSeconds": INT1,
        "timeoutSeconds": INT1,
        "failureThreshold": INT1,
        "successThreshold": INT1,
    }
)
INT_OR_PERCENT = {"type": ["integer", "string", "null"], "pattern": "^[0-9]+%$"}
PERSISTENCE = {
    "enabled": BOOL,
    "existingClaim": STR,
    "storageClassName": STR,
    "accessModes": ACCESS_MODES,
    "size": QUANTITY,
    "keep": BOOL,
}


def values_schema() -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "embedding-service values",
        "description": "Generated by `python -m scripts.gen_chart_schema`; do not edit by hand.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "global": MAP,
            "nameOverride": STR,
            "fullnameOverride": STR,
            "replicaCount": INT0,
            "revisionHistoryLimit": INT0,
            "strategy": MAP,
            "image": _obj(
                {
                    "repository": {"type": "string", "minLength": 1},
                    "tag": STR,
                    "flavor": {"type": "string", "enum": ["", "cpu", "gpu"]},
                    "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
                    "pullPolicy": PULL_POLICY,
                },
                required=["repository"],
            ),
            "imagePullSecrets": LIST,
            "config": config_schema(),
            "extraEnv": ENV_LIST,
            "model": _obj(
                {
                    "name": MODEL_NAME,
                    "mountPath": {"type": "string", "pattern": "^/"},
                    "bundleName": {"type": "string", "pattern": "^[A-Za-z0-9._-]*$"},
                    "persistence": _obj({**PERSISTENCE, "emptyDirSizeLimit": QUANTITY}),
                    "export": _obj(
                        {
                            "enabled": BOOL,
                            "mode": {"type": "string", "enum": ["initContainer", "job"]},
                            "source": {"type": "string", "minLength": 1},
                            "precision": {"type": "string", "enum": ["fp32", "fp16", "int8"]},
                            "revision": STR,
                            "extraArgs": {"type": "array", "items": STR},
                            "image": _obj(
                                {
                                    "repository": {"type": "string", "minLength": 1},
                                    "tag": STR,
                                    "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
                                    "pullPolicy": PULL_POLICY,
                                }
                            ),
                            "hfTokenSecret": _obj({"name": STR, "key": STR}),
                            "extraEnv": LIST,
                            "scratchSizeLimit": QUANTITY,
                            "resources": MAP,
                            "backoffLimit": INT0,
                            "activeDeadlineSeconds": INT1,
                        }
                    ),
                }
            ),
            "extraModels": {
                "type": "array",
                "items": _obj(
                    {
                        "name": {**MODEL_NAME, "minLength": 1},
                        "existingClaim": {"type": "string", "minLength": 1},
                        "bundleName": {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9._-]+$"},
                        "mountPath": {"type": "string", "pattern": "^/"},
                    },
                    required=["name", "existingClaim", "bundleName"],
                ),
            },
            "trtCache": _obj(
                {
                    "mountPath": {"type": "string", "pattern": "^/"},
                    "gpuType": STR,
                    "tensorrtVersion": STR,
                    "persistence": _obj(PERSISTENCE),
                }
            ),
            "auth": _obj(
                {
                    "enabled": BOOL,
                    "existingSecret": STR,
                    "secretKey": {"type": "string", "minLength": 1},
                    "keys": {
                        "type": "array",
                        # A key, optionally followed by name= and limits (docs/http.md, Per-key quotas).
                        "items": {
                            "type": "string",
                            "minLength": 1,
                            "pattern": r"^\S+( +(name|rpm|tpm|concurrency)=\S+)*$",
                        },
                    },
                }
            ),
            "tls": _obj(
                {
                    "enabled": BOOL,
                    "existingSecret": STR,
                    "certKey": STR,
                    "keyKey": STR,
                    "clientCA": _obj({"enabled": BOOL, "existingSecret": STR, "key": STR}),
                    "probeCAKey": STR,
                    "probeServerName": STR,
                }
            ),
            "probes": _obj({"startup": PROBE, "readiness": PROBE, "liveness": PROBE}),
            "preStopSleepSeconds": INT0,
            "terminationGraceExtraSeconds": INT0,
            "gpu": _obj(
                {
                    "count": {**INT0, "description": "GPUs per pod (nvidia.com/gpu); 0: none"},
                    "resourceName": {"type": "string", "minLength": 1},
                    "runtimeClassName": STR,
                }
            ),
            "resources": _obj({"requests": MAP, "limits": MAP, "claims": LIST}),
            "nodeSelector": STR_MAP,
            "tolerations": LIST,
            "affinity": MAP,
            "topologySpreadConstraints": LIST,
            "priorityClassName": STR,
            "podSecurityContext": MAP,
            "securityContext": MAP,
            "tmpSizeLimit": QUANTITY,
            "podAnnotations": STR_MAP,
            "podLabels": STR_MAP,
            "commonLabels": STR_MAP,
            "serviceAccount": _obj(
                {"create": BOOL, "name": STR, "annotations": STR_MAP, "automountServiceAccountToken": BOOL}
            ),
            "service": _obj(
                {
                    "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "annotations": STR_MAP,
                    "ports": _obj(
                        {
                            "grpc": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "http": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "metrics": {"type": "integer", "minimum": 1, "maximum": 65535},
                        }
                    ),
                    "headless": _obj({"enabled": BOOL}),
                }
            ),
            "autoscaling": _obj(
                {
                    "enabled": BOOL,
                    "minReplicas": INT1,
                    "maxReplicas": INT1,
                    "targetCPUUtilizationPercentage": {"type": ["integer", "null"], "minimum": 1},
                    "queueTime": _obj({"enabled": BOOL, "metricName": STR, "targetAverageValue": QUANTITY}),
                    "gpuUtilization": _obj(
                        {"enabled": BOOL, "metricName": STR, "targetAverageValue": QUANTITY}
                    ),
                    "extraMetrics": LIST,
                    "behavior": MAP,
                }
            ),
            "podDisruptionBudget": _obj(
                {"enabled": BOOL, "maxUnavailable": INT_OR_PERCENT, "minAvailable": INT_OR_PERCENT}
            ),
            "metrics": _obj(
                {
                    "serviceMonitor": _obj(
                        {
                            "enabled": BOOL,
                            "interval": STR,
                            "scrapeTimeout": STR,
                            "labels": STR_MAP,
                            "scheme": {"type": "string", "enum": ["http", "https"]},
                            "tlsConfig": MAP,
                        }
                    )
                }
            ),
            "networkPolicy": _obj({"enabled": BOOL, "allowFrom": LIST, "metricsAllowFrom": LIST}),
        },
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is out of date: run python -m scripts.gen_chart_schema", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
