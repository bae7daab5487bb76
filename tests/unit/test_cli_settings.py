"""Flags derived from settings: help names every env var and default; bad input is one line."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import BaseModel, Field

from tokenyard.common.cli_settings import add_settings_flags, flag_specs, new_parser, parse_settings
from tokenyard.common.settings import LogLevel, MetricsPortSettings, ServiceSettings, settings_config

pytestmark = pytest.mark.unit


class Knobs(BaseModel):
    credit: float = Field(default=1.0, ge=0, description="Overlap credit.")
    tracking: bool = Field(default=True, description="Track blocks.")


class DemoSettings(ServiceSettings, MetricsPortSettings):
    model_config = settings_config("demo")
    service_name: ClassVar[str] = "demo"

    port: int = Field(default=8100, ge=0, le=65535, description="gRPC port.")
    knobs: Knobs = Field(default_factory=Knobs, description="Router knobs.")


def test_every_field_has_a_flag_with_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help text to the terminal width
    parser = new_parser("tokenyard demo", "demo")
    add_settings_flags(parser, DemoSettings)
    text = parser.format_help()
    for spec in flag_specs(DemoSettings):
        assert spec.flag in text
        assert spec.env in text
    assert "TOKENYARD_DEMO_PORT; default 8100" in text
    assert "TOKENYARD_DEMO_KNOBS__CREDIT; default 1.0" in text
    assert "--no-knobs-tracking" in text


def test_flag_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENYARD_DEMO_PORT", "9000")
    monkeypatch.setenv("TOKENYARD_DEMO_LOG_LEVEL", "debug")
    monkeypatch.setenv("TOKENYARD_DEMO_KNOBS__CREDIT", "0.5")
    settings, _ = parse_settings(
        DemoSettings, ["--port", "9100", "--no-knobs-tracking"], "tokenyard demo", ""
    )
    assert settings.port == 9100
    assert settings.log_level is LogLevel.DEBUG
    assert settings.knobs.credit == 0.5
    assert settings.knobs.tracking is False
    assert settings.metrics_port == 0


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_settings(DemoSettings, argv, "tokenyard demo", "")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["--prot", "1"])
    assert "unknown flag --prot" in err


def test_invalid_value_names_flag_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["--port", "70000"])
    assert "--port" in err and "TOKENYARD_DEMO_PORT" in err and "70000" in err


def test_invalid_env_value_names_flag_and_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENYARD_DEMO_DISCOVERY_TTL", "soon")
    err = _one_line_error(capsys, [])
    assert "TOKENYARD_DEMO_DISCOVERY_TTL" in err and "--discovery-ttl" in err


def test_invalid_choice(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["--log-level", "loud"])
    assert "--log-level" in err


def test_nested_invalid_value(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["--knobs-credit", "-1"])
    assert "--knobs-credit" in err and "TOKENYARD_DEMO_KNOBS__CREDIT" in err


def test_advertised_host() -> None:
    assert DemoSettings(host="127.0.0.2").advertised_host() == "127.0.0.2"
    assert DemoSettings(host="0.0.0.0", advertise_host="router-1").advertised_host() == "router-1"
    assert DemoSettings(host="0.0.0.0").advertised_host() not in ("", "0.0.0.0")
