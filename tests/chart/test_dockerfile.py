"""The Dockerfile, parsed (no container engine here, so it is never built in CI): it installs the
same package extras as scripts/bootstrap.sh and the README, never both ONNX Runtimes in one image,
runs as the chart's non-root user and bakes no model in."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import pytest
import tomllib
import yaml
from chartlib import CHART, ROOT

pytestmark = pytest.mark.chart

DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS_RE = re.compile(r"""["']?\.\[([a-z0-9_,-]+)\]["']?""")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, op: str) -> list[str]:
        return [a for o, a in self.instructions if o == op]


def parse() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = rest.split()
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = Stage(name=name, base=base)
        elif current is None and op == "ARG":
            key, _, value = rest.partition("=")
            global_args[key] = value
        elif current is not None:
            current.instructions.append((op, rest))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse()


def parents(stage: Stage) -> list[Stage]:
    """Stages whose files end up in this one: FROM <stage> and COPY --from=<stage>."""
    out = [STAGES[stage.base]] if stage.base in STAGES else []
    for copy in stage.args("COPY"):
        m = re.search(r"--from=(\S+)", copy)
        if m and m.group(1) in STAGES:
            out.append(STAGES[m.group(1)])
    return out


def own_extras(stage: Stage) -> set[str]:
    extras: set[str] = set()
    for run in stage.args("RUN"):
        if "pip install" in run:
            for match in EXTRAS_RE.finditer(run):
                extras |= set(match.group(1).split(","))
    return extras


def all_extras(stage: Stage) -> set[str]:
    return own_extras(stage).union(*(all_extras(p) for p in parents(stage)))


def bootstrap_default_extras() -> set[str]:
    m = re.search(r'extras="\$\{1:-([a-z,]+)\}"', (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert m, "scripts/bootstrap.sh no longer declares its default extras"
    return set(m.group(1).split(","))


def pinned_torch(text: str) -> set[str]:
    return set(re.findall(r"torch==([0-9][0-9.]*)", text))


def test_targets_exist_with_entrypoints() -> None:
    assert {"cpu", "gpu", "export"} <= set(STAGES)
    assert list(STAGES)[-1] == "cpu", "the default target (last stage) is the slim CPU image"
    scripts = PYPROJECT["project"]["scripts"]
    for target, script in (("cpu", "embed-serve"), ("gpu", "embed-serve"), ("export", "embed-export")):
        assert STAGES[target].args("ENTRYPOINT") == [f'["{script}"]'], target
        assert script in scripts


def test_serving_images_install_exactly_one_onnxruntime() -> None:
    # otel: the images trace when `otlp_endpoint` is set (OpenTelemetry only, no onnxruntime).
    assert all_extras(STAGES["cpu"]) == {"cpu", "otel"}
    assert all_extras(STAGES["gpu"]) == {"gpu", "otel"}
    for stage in STAGES.values():
        assert not {"cpu", "gpu"} <= all_extras(stage), (
            f"{stage.name} installs onnxruntime and onnxruntime-gpu"
        )
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("onnxruntime-gpu") for d in optional["gpu"])
    assert any(d.startswith("onnxruntime") and "gpu" not in d for d in optional["cpu"])


def test_export_image_matches_bootstrap_and_readme() -> None:
    """The export image installs what `make serve` / scripts/bootstrap.sh install, torch pin included."""
    # The export image builds on the serving one, whose tracing extra it keeps (no onnxruntime in it).
    export = all_extras(STAGES["export"]) - {"otel"}
    assert export == bootstrap_default_extras() - {"dev"}
    serve_default = (ROOT / "scripts" / "serve-default.sh").read_text()
    m = re.search(r"bootstrap\.sh ([a-z,]+)", serve_default)
    assert m and set(m.group(1).split(",")) == export
    assert export <= set(PYPROJECT["project"]["optional-dependencies"])
    # The README's install lines, when it has any, name the same extras sets as the images.
    readme = (ROOT / "README.md").read_text()
    for match in EXTRAS_RE.finditer(readme):
        assert set(match.group(1).split(",")) <= set(PYPROJECT["project"]["optional-dependencies"])
    # torch: the same pin as bootstrap.sh and pyproject's export extra, installed before the extras.
    pins = pinned_torch(DOCKERFILE.read_text())
    assert pins == pinned_torch((ROOT / "scripts" / "bootstrap.sh").read_text())
    assert pins == pinned_torch(" ".join(PYPROJECT["project"]["optional-dependencies"]["export"]))
    (run,) = [r for r in STAGES["export-build"].args("RUN") if "torch==" in r]
    assert run.index("torch==") < run.index(".[")


def test_gpu_image_is_cuda_based_and_pins_tensorrt() -> None:
    gpu_root = STAGES["gpu"]
    while gpu_root.base in STAGES:
        gpu_root = STAGES[gpu_root.base]
    assert gpu_root.base == "${CUDA_BASE}"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", GLOBAL_ARGS["CUDA_BASE"])
    assert re.fullmatch(r"\d+(\.\d+)+", GLOBAL_ARGS["TENSORRT_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", GLOBAL_ARGS["ORT_GPU_VERSION"])
    (run,) = [r for r in STAGES["gpu-build"].args("RUN") if "pip install" in r]
    assert "onnxruntime-gpu==${ORT_GPU_VERSION}" in run and "tensorrt-cu12-libs==${TENSORRT_VERSION}" in run


def test_bases_are_pinned() -> None:
    for key in ("PYTHON_BASE", "CUDA_BASE"):
        image = GLOBAL_ARGS[key]
        assert ":" in image and not image.endswith((":latest", ":3", ":3.11")), f"{key}={image} is not pinned"
        assert re.search(r":\d+\.\d+\.\d+", image), f"{key}={image}: pin a full version"
    assert re.match(r"python:3\.11\.\d+-slim", GLOBAL_ARGS["PYTHON_BASE"])
    for stage in STAGES.values():
        assert stage.base in STAGES or stage.base.startswith("${"), (
            f"{stage.name}: unpinned base {stage.base}"
        )


def test_final_images_run_as_the_charts_non_root_user() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid, gid = values["securityContext"]["runAsUser"], values["securityContext"]["runAsGroup"]
    for target in ("cpu", "gpu", "export"):
        users = [u for s in [STAGES[target], *parents(STAGES[target])] for u in s.args("USER")]
        assert users[-1:] == [f"{uid}:{gid}"], f"{target}: USER must be numeric {uid}:{gid} (runAsNonRoot)"
    assert "--uid 10001" in DOCKERFILE.read_text() and uid == 10001


def test_read_only_root_filesystem_friendly() -> None:
    text = DOCKERFILE.read_text()
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert "HOME=/tmp" in text


def test_no_model_is_baked_in_and_copies_are_allow_listed() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines(), ".dockerignore must be an allow-list"
    for stage in STAGES.values():
        for copy in stage.args("COPY"):
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            if "--from=" in copy:
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"{stage.name}: COPY {source} does not exist"
                assert source.rstrip("/") in allowed, (
                    f"{stage.name}: COPY {source} is not in .dockerignore's allow-list"
                )
                assert not re.search(r"bundles?/|\.onnx|\.safetensors|models?/", source), source
    for pattern in ("bundles", ".venv", "tools", "*.onnx"):
        assert pattern not in allowed
