"""Values ↔ server settings: every env var the chart sets is a Settings field, every Settings field
can be set from values (or is set by the chart), and bad values are refused with a readable error."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from chartlib import CHART, Helm, Render, load_script

from service.settings import ENV_PREFIX, Settings, env_name, load_settings

pytestmark = pytest.mark.chart

gen_chart_schema = load_script("gen_chart_schema")
BAD_VALUES = sorted((Path(__file__).parent / "bad-values").glob("*.yaml"))
FIELDS = set(Settings.model_fields)


def config_properties() -> dict[str, Any]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return schema["properties"]["config"]["properties"]


def test_schema_file_is_generated_from_settings() -> None:
    on_disk = (CHART / "values.schema.json").read_text()
    assert on_disk == gen_chart_schema.render(), "stale: run python -m scripts.gen_chart_schema"


def test_every_setting_is_exposed_in_config_or_set_by_the_chart() -> None:
    exposed = set(config_properties())
    managed = set(gen_chart_schema.CHART_MANAGED)
    assert not exposed & managed
    assert exposed | managed == FIELDS, f"missing: {FIELDS - exposed - managed}, unknown: {exposed - FIELDS}"
    assert set(yaml.safe_load((CHART / "values.yaml").read_text())["config"]) <= exposed


def test_every_env_var_the_chart_sets_is_a_setting(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        for where, spec in render.pod_specs():
            for container in spec.get("initContainers", []) + spec["containers"]:
                for var in container.get("env", []):
                    label = f"{name}: {where}/{container['name']} sets {var['name']}"
                    if var["name"].startswith(ENV_PREFIX):
                        assert var["name"].removeprefix(ENV_PREFIX).lower() in FIELDS, label
                        assert container["name"] == "server", label
        names = [e["name"] for e in render.server["env"]]
        assert len(names) == len(set(names)), f"{name}: duplicate env vars {names}"
        assert all(n.startswith(ENV_PREFIX) for n in names), f"{name}: {names}"


def test_rendered_env_is_accepted_by_the_server(renders: dict[str, Render]) -> None:
    """The server's own loader (unknown EMBED_* vars and bad values are errors) takes every render."""
    for name, render in renders.items():
        settings = load_settings([], environ=render.server_env())
        ports = {p["name"]: p["containerPort"] for p in render.server["ports"]}
        assert settings.host == "0.0.0.0", name
        assert settings.port == ports["grpc"], name
        assert settings.http_port == ports.get("http"), name
        assert settings.metrics_port == ports.get("metrics"), name


def test_chart_managed_settings_are_set_somewhere_in_the_matrix(renders: dict[str, Render]) -> None:
    seen = set().union(*(render.server_env() for render in renders.values()))
    assert {env_name(f) for f in gen_chart_schema.CHART_MANAGED} <= seen


def _non_default(name: str) -> Any:
    """A valid value for `name` that differs from the server default where that is easy."""
    info = Settings.model_fields[name]
    prop = config_properties()[name]
    default = info.default
    kind = prop["type"][0] if isinstance(prop["type"], list) else prop["type"]
    if "enum" in prop:
        choices = [c for c in prop["enum"] if c is not None]
        return default if name == "provider" else next((c for c in choices if c != default), choices[0])
    if kind == "boolean":
        return default if name in ("trt_fp16",) else not default
    if kind == "integer":
        value = 2**33 if default is None else default + 1
        return min(value, prop.get("maximum", value))
    if kind == "number":
        return 2.5 if default is None else default + 0.5
    if kind == "array":  # a list setting (model_alias): the chart joins it with commas
        return ["alias-a=model-a", "alias-b=model-b"]
    assert typing.get_origin(info.annotation) is not Literal
    return "sample-name"


def test_every_exposed_setting_reaches_the_server(helm: Helm, tmp_path: Path) -> None:
    config = {name: _non_default(name) for name in config_properties()}
    values = tmp_path / "all-settings.yaml"
    values.write_text(yaml.safe_dump({"config": config}))
    render = helm.template(values)
    env = render.server_env()
    for name in config:
        assert env_name(name) in env, f"{name} is not passed to the server"
    loaded = load_settings([], environ=env)
    for name, value in config.items():
        value = tuple(value) if isinstance(value, list) else value
        assert getattr(loaded, name) == value, f"{name}: {env[env_name(name)]!r} -> {getattr(loaded, name)!r}"


@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda p: p.stem)
def test_bad_values_are_refused_with_a_readable_error(helm: Helm, values: Path) -> None:
    first = values.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{values.name}: first line must be '# expect: <message>'"
    expected = first.removeprefix("# expect: ")
    proc = helm.run("template", "rel", str(CHART), "-f", str(values), check=False)
    assert proc.returncode != 0, f"{values.name} was accepted"
    assert expected in proc.stderr, proc.stderr
    assert "goroutine" not in proc.stderr and "nil pointer" not in proc.stderr, proc.stderr
