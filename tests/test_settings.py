"""The settings object: precedence, validation, and the README table generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, env_name, load_settings, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_cli_beats_environment_beats_default() -> None:
    s = load_settings(["--port", "7"], {"EMBED_PORT": "5", "EMBED_PROVIDER": "cuda"})
    assert s.port == 7
    assert s.provider == "cuda"
    assert s.max_batch_size == Settings.model_fields["max_batch_size"].default


def test_boolean_flags_both_ways() -> None:
    assert load_settings(["--allow-dimensions"], {}).allow_dimensions is True
    assert load_settings(["--no-self-test"], {"EMBED_SELF_TEST": "true"}).self_test is False


def test_unknown_environment_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="EMBED_PORTT"):
        load_settings([], {"EMBED_PORTT": "1"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "port"),
        (["--provider", "rocm"], "invalid choice"),
        (["--tls-cert-file", "/x.pem"], "tls_cert_file and tls_key_file"),
        (["--trt-fp16", "--trt-bf16"], "trt_fp16 and trt_bf16"),
    ],
)
def test_bad_values_are_refused_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises((ValidationError, SystemExit, ValueError)) as info:
        load_settings(argv, {})
    text = str(info.value) + capsys.readouterr().err
    assert message in text


def test_every_setting_has_a_description_and_env_name() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert env_name(name) == "EMBED_" + name.upper()


def test_readme_table_matches_the_settings_object() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, (
        "README settings table is stale: run `python -m service.settings --markdown`"
    )
