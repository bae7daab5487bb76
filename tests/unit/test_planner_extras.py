"""The planner's optional parts: a setting whose package is missing is refused at startup, naming
the setting and the extra to install; the default-free settings need none of them."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tokenyard.common.service import StartupError
from tokenyard.planner import dry_run
from tokenyard.planner.config import ConnectorKind, PredictorKind
from tokenyard.planner.extras import INSTALL, require_for

pytestmark = pytest.mark.unit


def _without(monkeypatch: pytest.MonkeyPatch, *missing: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in missing else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_arima_and_kubernetes_name_the_extra_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "statsmodels", "kubernetes")
    with pytest.raises(
        StartupError, match=r"--throughput-predictor arima.*'statsmodels'.*tokenyard\[planner\]"
    ):
        require_for(PredictorKind.ARIMA, ConnectorKind.LOCAL)
    with pytest.raises(StartupError, match=r"--connector kubernetes.*'kubernetes'"):
        require_for(PredictorKind.KALMAN, ConnectorKind.KUBERNETES)
    # Everything else runs on the core dependencies.
    for predictor in (PredictorKind.CONSTANT, PredictorKind.MOVING_AVERAGE, PredictorKind.KALMAN):
        for connector in (ConnectorKind.NONE, ConnectorKind.LOCAL, ConnectorKind.VIRTUAL):
            require_for(predictor, connector)


def test_the_dry_run_says_what_to_install_for_its_chart(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without(monkeypatch, "matplotlib")
    assert dry_run.main(["--profile", "p.json", "--trace", "t.jsonl", "--predictor", "kalman"]) == 2
    err = capsys.readouterr().err
    assert "'matplotlib'" in err and INSTALL in err
