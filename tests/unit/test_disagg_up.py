"""``tokenyard up --prefill-workers N --decode-workers M``: the processes of a split deployment."""

from __future__ import annotations

import pytest

from tokenyard.common.cli_settings import parse_settings
from tokenyard.deploy.up import UpSettings, plan

pytestmark = pytest.mark.unit


def _settings(*argv: str) -> UpSettings:
    settings, _ = parse_settings(UpSettings, ["--engine", "mocker", *argv], "tokenyard up", "")
    return settings


def _workers(settings: UpSettings) -> list[tuple[str, str | None, str]]:
    """(name, --role value or None, --port value) of each worker child, in start order."""
    out = []
    for child in plan(settings):
        argv = child.argv
        if "worker" not in argv:
            continue
        role = argv[argv.index("--role") + 1] if "--role" in argv else None
        out.append((child.name, role, argv[argv.index("--port") + 1]))
    return out


def test_a_split_deployment_starts_prefill_then_decode_workers() -> None:
    settings = _settings("--prefill-workers", "1", "--decode-workers", "2", "--worker-port", "19600")
    assert _workers(settings) == [
        ("prefill-0", "prefill", "19600"),
        ("decode-0", "decode", "19601"),
        ("decode-1", "decode", "19602"),
    ]
    assert settings.describe_workers() == "1 prefill + 2 decode"
    # The frontend starts last, as ever.
    assert plan(settings)[-1].name == "frontend"


def test_aggregated_workers_by_default() -> None:
    settings = _settings("--workers", "3", "--worker-port", "19600")
    assert _workers(settings) == [(f"worker-{i}", None, str(19600 + i)) for i in range(3)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--prefill-workers", "2"), "needs --decode-workers"),
        (("--prefill-workers", "1", "--decode-workers", "1", "--workers", "2"), "exclude each other"),
    ],
)
def test_inconsistent_topologies_are_refused(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _settings(*argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_decode_workers_alone_serve_like_aggregated_ones() -> None:
    assert [role for _, role, _ in _workers(_settings("--decode-workers", "2"))] == ["decode", "decode"]
