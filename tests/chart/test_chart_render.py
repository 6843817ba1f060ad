"""The chart, rendered by the real helm over the CI values matrix and checked object by object."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chartlib import CHART, CI_VALUES, NAMESPACE, ROOT, Helm, Render

pytestmark = pytest.mark.chart

KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema available.
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
GRPC_SERVICE = "embedding.v1.EmbeddingService"
SECURE = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}


def ci_values(stem: str) -> dict:
    return yaml.safe_load((ROOT / "helm" / "ci" / f"{stem}-values.yaml").read_text()) or {}


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def effective(stem: str, *path: str):
    """A value as the render saw it: the CI file's, else the chart default's."""
    for source in (ci_values(stem), chart_values()):
        node = source
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            return node
    raise KeyError(path)


# --- helm lint and schema validation of every render ---------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict(helm: Helm, values: Path) -> None:
    proc = helm.run("lint", "--strict", str(CHART), "-f", str(values), "--namespace", NAMESPACE)
    out = proc.stdout + proc.stderr
    assert "0 chart(s) failed" in out, out
    # helm lint downgrades a template `fail` to an [INFO] line: treat it as the error it is.
    assert "[ERROR]" not in out and "[WARNING]" not in out and "Fail:" not in out, out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_render_passes_kubernetes_validate_strict(
    renders: dict[str, Render], tmp_path: Path, kube_version: str
) -> None:
    files = []
    for name, render in renders.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(render.text)
        files.append(str(path))
    proc = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", kube_version, *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Only the Prometheus Operator CRD has no bundled schema; anything else unknown is a typo.
    unknown = [line for line in proc.stdout.splitlines() if "Couldn't find schema" in line]
    assert all("kind ServiceMonitor" in line for line in unknown), unknown


def test_kubernetes_validate_rejects_a_broken_render(renders: dict[str, Render], tmp_path: Path) -> None:
    """Negative control: the validator really runs in strict mode (a typo'd field fails)."""
    docs = [dict(d) for d in renders["default"].docs]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "readinesProbe" in proc.stdout + proc.stderr


def test_ci_matrix_is_complete() -> None:
    stems = {p.name.removesuffix("-values.yaml") for p in CI_VALUES}
    assert {"default", "gpu-tensorrt", "cpu-only", "hpa", "tls-keys-existing-secret", "export-job"} <= stems


# --- probes ----------------------------------------------------------------------------------------


def test_probes_are_native_grpc_health_checks(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        if effective(name, "tls", "enabled"):
            continue
        server = render.server
        grpc_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = server[kind]
            assert set(probe) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, f"{name}: {kind}"
            assert probe["grpc"]["port"] == grpc_port, f"{name}: {kind} probes another port"
        # Readiness follows the embedding service itself (warm-up, self-test, draining).
        assert server["readinessProbe"]["grpc"]["service"] == GRPC_SERVICE
        assert server["livenessProbe"]["grpc"]["service"] == ""


def test_tls_probes_exec_the_health_check_script_with_tls(renders: dict[str, Render]) -> None:
    render = renders["tls-keys-existing-secret"]
    server = render.server
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = server[kind]["exec"]["command"]
        assert command[0] == "python"
        script = Path(command[1])
        assert mounts.get(str(script.parent)) == "scripts", f"{script} is not mounted"
        assert "--tls" in command
        # mTLS: the probe presents a client certificate.
        assert any(a.startswith("--cert-file=") for a in command)
        assert any(a.startswith("--key-file=") for a in command)
    assert f"--service={GRPC_SERVICE}" in server["readinessProbe"]["exec"]["command"]
    configmap = render.one("ConfigMap")
    assert configmap["data"]["grpc-health-check.py"] == (CHART / "files" / "grpc-health-check.py").read_text()


def test_startup_probe_allows_a_tensorrt_engine_build(renders: dict[str, Render]) -> None:
    probe = renders["gpu-tensorrt"].server["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30 * 60
    default = renders["default"].server["startupProbe"]
    assert default["periodSeconds"] * default["failureThreshold"] >= 5 * 60


# --- pod-level settings -----------------------------------------------------------------------------


def test_enable_service_links_is_off_in_every_pod(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        for where, spec in render.pod_specs():
            assert spec.get("enableServiceLinks") is False, f"{name}: {where}"


def test_termination_grace_exceeds_drain(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        spec = render.deployment["spec"]["template"]["spec"]
        grace = float(render.server_env()["EMBED_GRACE_PERIOD_S"])
        pre_stop = render.server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] > math.ceil(grace) + pre_stop, name


def test_grace_period_follows_the_setting(helm: Helm) -> None:
    # `--set` turns 120.5 into a string (the schema rejects it): floats need --set-json or a file.
    render = helm.template(
        sets=("preStopSleepSeconds=0",), extra=("--set-json", "config.grace_period_s=120.5")
    )
    spec = render.deployment["spec"]["template"]["spec"]
    assert render.server_env()["EMBED_GRACE_PERIOD_S"] == "120.5"
    assert spec["terminationGracePeriodSeconds"] == 121 + 15
    assert "lifecycle" not in render.server


def test_security_context_on_every_container(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        for where, spec in render.pod_specs():
            assert spec["securityContext"]["runAsNonRoot"] is True, f"{name}: {where}"
            assert spec.get("automountServiceAccountToken") is False, f"{name}: {where}"
            for container in spec.get("initContainers", []) + spec["containers"]:
                ctx = container["securityContext"]
                label = f"{name}: {where}/{container['name']}"
                assert {k: ctx.get(k) for k in SECURE} == SECURE, label
                assert ctx["capabilities"]["drop"] == ["ALL"], label
                assert "add" not in ctx["capabilities"], label
                assert ctx.get("privileged") is not True, label


def test_tmp_is_a_writable_emptydir(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        spec = render.deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (tmp,) = [m for m in render.server["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]], name
        assert not tmp.get("readOnly"), name
        model = next(m for m in render.server["volumeMounts"] if m["name"] == "model")
        assert model["readOnly"] is True, f"{name}: the server must not write the bundle"


def test_gpu_resources_only_when_asked(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        wanted = effective(name, "gpu", "count")
        resources = render.server["resources"]
        if wanted:
            assert resources["limits"]["nvidia.com/gpu"] == wanted, name
            assert resources["requests"]["nvidia.com/gpu"] == wanted, name
        else:
            assert "nvidia.com/gpu" not in resources.get("limits", {}), name
            assert "nvidia.com/gpu" not in resources.get("requests", {}), name
            assert "nvidia.com/gpu" not in render.text, name
        for where, spec in render.pod_specs():
            for container in spec.get("initContainers", []) + spec["containers"]:
                if container["name"] != "server":
                    assert "nvidia.com/gpu" not in str(container.get("resources")), f"{name}: {where}"


def test_gpu_provider_needs_a_gpu(helm: Helm) -> None:
    with pytest.raises(Exception, match=r"config.provider=cuda needs a GPU: set gpu.count >= 1"):
        helm.template(sets=("config.provider=cuda",))


def test_scheduling_values_reach_the_pod(renders: dict[str, Render]) -> None:
    spec = renders["gpu-tensorrt"].deployment["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    (spread,) = spec["topologySpreadConstraints"]
    assert (
        spread["labelSelector"]["matchLabels"]
        == renders["gpu-tensorrt"].deployment["spec"]["selector"]["matchLabels"]
    )
    assert "runtimeClassName" not in spec
    assert renders["hpa"].deployment["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


def test_image_flavor_follows_the_provider(renders: dict[str, Render]) -> None:
    assert renders["default"].server["image"].endswith(":0.1.0-cpu")
    assert renders["export-job"].server["image"].endswith(":0.1.0-gpu")
    assert renders["gpu-tensorrt"].server["image"].endswith(":0.1.0-gpu")


# --- labels and selectors ---------------------------------------------------------------------------


def _selectors(render: Render) -> dict[str, dict]:
    out = {"Deployment": render.deployment["spec"]["selector"]["matchLabels"]}
    for svc in render.of_kind("Service"):
        out[f"Service/{svc['metadata']['name']}"] = svc["spec"]["selector"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for doc in render.of_kind(kind):
            key = "podSelector" if kind == "NetworkPolicy" else "selector"
            out[kind] = doc["spec"][key]["matchLabels"]
    return out


def test_selector_labels_are_stable_across_upgrades(helm: Helm, chart_copy) -> None:
    def bump(chart: Path) -> None:
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        meta["version"] = "7.8.9"
        meta["appVersion"] = "9.9.9"
        (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))

    ci = ROOT / "helm" / "ci" / "cpu-only-values.yaml"
    before = helm.template(ci)
    after = helm.template(
        ci,
        chart=chart_copy(bump),
        sets=("image.tag=2.0.0-cpu", "config.log_level=debug", "podLabels.team=search", "replicaCount=3"),
    )
    assert after.deployment["metadata"]["labels"]["helm.sh/chart"] == "embedding-service-7.8.9"
    assert after.deployment["metadata"]["labels"]["app.kubernetes.io/version"] == "9.9.9"
    assert _selectors(before) == _selectors(after)
    assert len(_selectors(before)) >= 5


def test_selectors_match_pods_and_use_only_fixed_labels(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        pod_labels = render.deployment["spec"]["template"]["metadata"]["labels"]
        for where, selector in _selectors(render).items():
            assert set(selector) == {
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
            }, f"{name}: {where}"
            assert selector.items() <= pod_labels.items(), f"{name}: {where} does not select the pods"
        for job in render.of_kind("Job"):
            job_labels = job["spec"]["template"]["metadata"]["labels"]
            assert not render.deployment["spec"]["selector"]["matchLabels"].items() <= job_labels.items()


def test_standard_labels_on_every_resource(renders: dict[str, Render]) -> None:
    required = {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "helm.sh/chart",
    }
    for name, render in renders.items():
        for doc in render.docs:
            labels = doc["metadata"].get("labels", {})
            assert required <= set(labels), f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            assert doc["metadata"]["namespace"] == NAMESPACE


# --- services, scaling, disruption ------------------------------------------------------------------


def test_services_expose_grpc_http_and_metrics(renders: dict[str, Render]) -> None:
    render = renders["cpu-only"]
    fullname = render.deployment["metadata"]["name"]
    service = render.one("Service", fullname)
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "http", "metrics"}
    container_ports = {p["name"] for p in render.server["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= container_ports
    headless = render.one("Service", f"{fullname}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == service["spec"]["selector"]
    # Without metrics_port, /metrics is on the HTTP port and there is no metrics port.
    default_ports = {p["name"] for p in renders["default"].one("Service", fullname)["spec"]["ports"]}
    assert default_ports == {"grpc", "http"}


def test_servicemonitor_scrapes_the_clusterip_service_once(renders: dict[str, Render]) -> None:
    render = renders["cpu-only"]
    monitor = render.one("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]
    selected = [
        s
        for s in render.of_kind("Service")
        if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
        and not any(e["key"] in s["metadata"]["labels"] for e in selector["matchExpressions"])
    ]
    assert [s["metadata"]["name"] for s in selected] == [render.deployment["metadata"]["name"]]
    assert renders["tls-keys-existing-secret"].one("ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"


def test_hpa_scales_on_queue_time_and_gpu(renders: dict[str, Render]) -> None:
    render = renders["hpa"]
    hpa = render.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == render.deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    metrics = {
        m["pods"]["metric"]["name"]: m["pods"]["target"]
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Pods"
    }
    assert metrics["embed_queue_duration_seconds_p90"] == {"type": "AverageValue", "averageValue": "50m"}
    assert "DCGM_FI_DEV_GPU_UTIL" in metrics
    assert all(m["type"] != "Resource" for m in hpa["spec"]["metrics"])
    assert "replicas" not in render.deployment["spec"], "the HPA owns replicas"
    assert render.one("PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": render.deployment["spec"]["selector"],
    }
    for name in ("default", "gpu-tensorrt"):
        assert not renders[name].of_kind("HorizontalPodAutoscaler")
    assert renders["gpu-tensorrt"].deployment["spec"]["replicas"] == 2


def test_network_policy_limits_ingress(renders: dict[str, Render]) -> None:
    policy = renders["cpu-only"].one("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    serving, metrics = policy["spec"]["ingress"]
    assert {p["port"] for p in serving["ports"]} == {"grpc", "http"}
    assert serving["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "search"}
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert not renders["default"].of_kind("NetworkPolicy")


# --- model bundle, TensorRT cache, secrets ---------------------------------------------------------


def test_tensorrt_cache_is_keyed_by_gpu_and_tensorrt_version(helm: Helm, renders: dict[str, Render]) -> None:
    render = renders["gpu-tensorrt"]
    cache_dir = render.server_env()["EMBED_TRT_CACHE_DIR"]
    assert cache_dir == "/var/cache/embed-trt/NVIDIA-H100-80GB-HBM3/trt-10.9.0.34/gte-Qwen2-7B-instruct-fp16"
    mount = next(m for m in render.server["volumeMounts"] if m["name"] == "trt-cache")
    assert cache_dir.startswith(mount["mountPath"] + "/")
    volume = next(
        v for v in render.deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "trt-cache"
    )
    claim = render.one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    ci = ROOT / "helm" / "ci" / "gpu-tensorrt-values.yaml"
    other_gpu = helm.template(ci, sets=("trtCache.gpuType=L40S",)).server_env()["EMBED_TRT_CACHE_DIR"]
    other_trt = helm.template(ci, sets=("trtCache.tensorrtVersion=10.13.3.9",)).server_env()[
        "EMBED_TRT_CACHE_DIR"
    ]
    assert len({cache_dir, other_gpu, other_trt}) == 3
    # No cache volume or variable when TensorRT is not used.
    assert "EMBED_TRT_CACHE_DIR" not in renders["default"].server_env()
    assert not [
        c for c in renders["default"].of_kind("PersistentVolumeClaim") if "trt" in c["metadata"]["name"]
    ]


def test_tensorrt_requires_cache_keys(helm: Helm) -> None:
    with pytest.raises(Exception, match=r"trtCache.gpuType is required"):
        helm.template(sets=("config.provider=tensorrt", "gpu.count=1"))


def test_model_dir_points_into_the_model_volume(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        model_dir = render.server_env()["EMBED_MODEL_DIR"].split(",")[0].rpartition("=")[2]
        mount = next(m for m in render.server["volumeMounts"] if m["name"] == "model")
        assert model_dir.startswith(mount["mountPath"].rstrip("/") + "/"), name
    assert renders["default"].server_env()["EMBED_MODEL_DIR"] == "/models/all-MiniLM-L6-v2-fp32"
    assert (
        renders["export-job"].server_env()["EMBED_MODEL_DIR"]
        == "/models/Alibaba-NLP--gte-Qwen2-7B-instruct-fp16"
    )
    volumes = {
        v["name"]: v for v in renders["gpu-tensorrt"].deployment["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "embedding-models"


def test_two_models_each_on_its_volume(renders: dict[str, Render]) -> None:
    render = renders["two-models"]
    env = render.server_env()
    assert env["EMBED_MODEL_DIR"] == (
        "minilm=/models/all-MiniLM-L6-v2-fp32,bge-small=/models-extra/0/BAAI--bge-small-en-v1.5-fp32"
    )
    assert env["EMBED_MODEL_ALIAS"] == "text-embedding-3-small=minilm"
    mounts = {m["name"]: m for m in render.server["volumeMounts"]}
    assert mounts["model-extra-0"] == {
        "name": "model-extra-0",
        "mountPath": "/models-extra/0",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in render.deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["model-extra-0"]["persistentVolumeClaim"]
    assert claim == {"claimName": "bge-small-bundle", "readOnly": True}
    # The settings the chart writes are ones the server accepts.
    from service.settings import load_settings

    settings = load_settings([], {k: v for k, v in env.items() if k.startswith("EMBED_")})
    assert [spec.name for spec in settings.models()] == ["minilm", "bge-small"]
    assert settings.aliases() == {"text-embedding-3-small": "minilm"}


def test_default_exports_the_builtin_model_in_an_init_container(renders: dict[str, Render]) -> None:
    spec = renders["default"].deployment["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["BUNDLE_SOURCE"] == "builtin:all-MiniLM-L6-v2"
    assert env["BUNDLE_DIR"] == renders["default"].server_env()["EMBED_MODEL_DIR"]
    assert init["image"].endswith(":0.1.0-export")
    assert init["command"] == ["sh", "/etc/embed/scripts/export-bundle.sh"]
    writable = next(m for m in init["volumeMounts"] if m["name"] == "model")
    assert not writable.get("readOnly")
    assert not renders["default"].of_kind("Job")


def test_export_job_fills_the_pvc_and_pods_wait(helm: Helm, renders: dict[str, Render]) -> None:
    render = renders["export-job"]
    job = render.one("Job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["BUNDLE_SOURCE"]["value"] == "Alibaba-NLP/gte-Qwen2-7B-instruct"
    assert env["BUNDLE_PRECISION"]["value"] == "fp16"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    job_claim = next(v for v in spec["volumes"] if v["name"] == "model")["persistentVolumeClaim"]["claimName"]
    pod_spec = render.deployment["spec"]["template"]["spec"]
    pod_claim = next(v for v in pod_spec["volumes"] if v["name"] == "model")["persistentVolumeClaim"][
        "claimName"
    ]
    assert job_claim == pod_claim
    assert (
        render.one("PersistentVolumeClaim", job_claim)["spec"]["resources"]["requests"]["storage"] == "60Gi"
    )
    (wait,) = pod_spec["initContainers"]
    assert wait["name"] == "wait-for-bundle"
    assert render.server_env()["EMBED_MODEL_DIR"] in wait["command"]
    # A different model is a different Job (a Job's pod template is immutable).
    ci = ROOT / "helm" / "ci" / "export-job-values.yaml"
    other = helm.template(ci, sets=("model.export.precision=int8",)).one("Job")
    assert other["metadata"]["name"] != job["metadata"]["name"]
    assert helm.template(ci).one("Job")["metadata"]["name"] == job["metadata"]["name"]
    # A pinned revision is passed to embed-export and gets its own bundle directory.
    pinned = helm.template(ci, sets=("model.export.revision=0123456789abcdef0123",))
    assert pinned.one("Job")["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "--revision",
        "0123456789abcdef0123",
    ]
    assert (
        pinned.server_env()["EMBED_MODEL_DIR"]
        == "/models/Alibaba-NLP--gte-Qwen2-7B-instruct-0123456789ab-fp16"
    )
    assert pinned.one("Job")["metadata"]["name"] != job["metadata"]["name"]


def test_export_script_in_configmap_is_the_chart_file(renders: dict[str, Render]) -> None:
    data = renders["export-job"].one("ConfigMap")["data"]
    assert data["export-bundle.sh"] == (CHART / "files" / "export-bundle.sh").read_text()
    proc = subprocess.run(
        ["sh", "-n", str(CHART / "files" / "export-bundle.sh")], capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_api_keys_from_existing_secret(renders: dict[str, Render]) -> None:
    render = renders["tls-keys-existing-secret"]
    env = render.server_env()
    assert env["EMBED_API_KEYS_FILE"] == "/etc/embed/api-keys/keys.txt"
    spec = render.deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "embedding-api-keys"
    mount = next(m for m in render.server["volumeMounts"] if m["name"] == "api-keys")
    assert Path(env["EMBED_API_KEYS_FILE"]).parent == Path(mount["mountPath"])
    assert not render.of_kind("Secret"), "an existing secret must not be created"


def test_api_keys_secret_created_from_values(renders: dict[str, Render]) -> None:
    import base64

    render = renders["export-job"]
    secret = render.one("Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "key-one\nkey-two\n"
    annotations = render.deployment["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/api-keys" in annotations, "pods must restart when the keys change"


def test_tls_secret_mounts(renders: dict[str, Render]) -> None:
    render = renders["tls-keys-existing-secret"]
    env = render.server_env()
    assert env["EMBED_TLS_CERT_FILE"] == "/etc/embed/tls/tls.crt"
    assert env["EMBED_TLS_KEY_FILE"] == "/etc/embed/tls/tls.key"
    assert env["EMBED_TLS_CLIENT_CA_FILE"] == "/etc/embed/client-ca/ca.crt"
    volumes = {v["name"]: v for v in render.deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "embedding-tls"
    mounts = {m["name"]: m for m in render.server["volumeMounts"]}
    for var, volume in (("EMBED_TLS_CERT_FILE", "tls"), ("EMBED_TLS_CLIENT_CA_FILE", "client-ca")):
        assert Path(env[var]).parent == Path(mounts[volume]["mountPath"])
        assert mounts[volume]["readOnly"] is True
    for name in ("default", "cpu-only"):
        assert not any(k.startswith("EMBED_TLS") for k in renders[name].server_env())


def test_notes_show_port_forward_and_grpcurl(helm: Helm, chart_copy) -> None:
    def add_notes_renderer(chart: Path) -> None:
        (chart / "templates" / "notes-render.yaml").write_text(
            'notes: {{ include "embedding-service/templates/NOTES.txt" . | toJson }}\n'
        )

    chart = chart_copy(add_notes_renderer)
    notes = yaml.safe_load(
        helm.template(chart=chart, extra=("--show-only", "templates/notes-render.yaml")).text
    )["notes"]
    assert f"kubectl -n {NAMESPACE} port-forward svc/rel-embedding-service 50051:50051" in notes
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in notes
    assert "embedding.v1.EmbeddingService/Embed" in notes
    assert f"dns:///rel-embedding-service-headless.{NAMESPACE}.svc.cluster.local:50051" in notes
    tls_notes = yaml.safe_load(
        helm.template(
            ROOT / "helm" / "ci" / "tls-keys-existing-secret-values.yaml",
            chart=chart,
            extra=("--show-only", "templates/notes-render.yaml"),
        ).text
    )["notes"]
    assert "-plaintext" not in tls_notes and "-cacert" in tls_notes and "-cert client.crt" in tls_notes
