"""The planner's optional parts, installed by the ``planner`` extra (``pip install 'tokenyard[planner]'``).

The planner runs without them (constant, moving-average and Kalman predictors; the local, virtual
and no-op connectors); a setting that needs one is refused at startup with what to install,
instead of failing at the first decision.
"""

from __future__ import annotations

import importlib.util

from tokenyard.common.service import StartupError
from tokenyard.planner.config import ConnectorKind, PredictorKind

INSTALL = "pip install 'tokenyard[planner]'"


def require(module: str, what: str) -> None:
    """StartupError unless ``module`` can be imported; ``what`` names the setting that needs it."""
    if importlib.util.find_spec(module) is None:
        raise StartupError(f"{what} needs the Python package {module!r}, which is not installed: {INSTALL}")


def require_for(
    predictor: PredictorKind,
    connector: ConnectorKind | None = None,
    predictor_flag: str = "--throughput-predictor",
) -> None:
    """What the chosen predictor and connector import."""
    if predictor is PredictorKind.ARIMA:
        require("statsmodels", f"the arima predictor ({predictor_flag} arima; kalman needs no extra)")
    if connector is ConnectorKind.KUBERNETES:
        require("kubernetes", "the kubernetes connector (--connector kubernetes)")
