"""The frontend's default output cap and request timeout: on by default, raisable, in --help."""

from __future__ import annotations

import pytest

from tokenyard.common.cli_settings import add_settings_flags, new_parser
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.limits import Limits

pytestmark = pytest.mark.unit


def test_a_request_naming_no_limit_gets_the_default_within_its_context() -> None:
    limits = Limits(default_max_tokens=4096)
    assert limits.output_tokens(None) is None  # decided once the prompt's length is known
    assert limits.default_output(None, prompt_tokens=100, context_length=8192) == 4096
    assert limits.default_output(None, prompt_tokens=100, context_length=2048) == 1948
    assert limits.default_output(50_000, prompt_tokens=100, context_length=200_000) == 50_000
    capped = Limits(default_max_tokens=4096, max_output_tokens=1000)
    assert capped.default_output(None, prompt_tokens=10, context_length=8192) == 1000
    assert Limits().default_output(None, prompt_tokens=10, context_length=8192) is None


def test_defaults_are_on_and_a_deployment_raises_them(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = FrontendSettings()
    assert settings.default_max_tokens == 4096 and settings.request_timeout == 600.0
    monkeypatch.setenv("TOKENYARD_FRONTEND_REQUEST_TIMEOUT", "3600")
    monkeypatch.setenv("TOKENYARD_FRONTEND_DEFAULT_MAX_TOKENS", "32768")
    raised = FrontendSettings()
    assert raised.default_max_tokens == 32768 and raised.request_timeout == 3600.0


def test_help_lists_the_limits_and_connection_timeouts() -> None:
    parser = new_parser("tokenyard frontend", "")
    add_settings_flags(parser, FrontendSettings)
    text = parser.format_help()
    for flag in (
        "--default-max-tokens",
        "--request-timeout",
        "--http-max-connections",
        "--http-header-timeout",
        "--http-body-timeout",
        "--http-idle-timeout",
    ):
        assert flag in text, flag
    assert "TOKENYARD_FRONTEND_DEFAULT_MAX_TOKENS" in text
