"""The engine registry: every offered engine has a package, the choices are exactly those, and each
engine carries the capabilities its kind promises."""

from __future__ import annotations

import importlib

import pytest

from tokenyard.common.cli_settings import parse_settings
from tokenyard.worker.config import WorkerSettings
from tokenyard.worker.engines import ENGINES, EngineKind, create_engine
from tokenyard.worker.engines.base import (
    EngineRole,
    GuidedDecoder,
    KvBlockTransfer,
    StepMetricsSource,
)
from tokenyard.worker.engines.core.engine import BatchingEngine

pytestmark = pytest.mark.unit


def test_every_offered_engine_is_registered_with_a_factory() -> None:
    assert set(ENGINES) == set(EngineKind)
    for kind, entry in ENGINES.items():
        assert entry.module == f"tokenyard.worker.engines.{kind.value}"
        # Importing the package must not need the engine's heavy dependencies: only create() may.
        module = importlib.import_module(entry.module)
        assert callable(module.create)


def test_an_unknown_engine_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(WorkerSettings, ["--engine", "trtllm"], "tokenyard worker", "")
    assert exited.value.code != 0
    err = capsys.readouterr().err
    assert "--engine" in err and "'trtllm'" in err and "'mocker', 'cpu' or 'vllm'" in err, err


def test_the_mocker_is_a_batching_engine_without_kv_bytes() -> None:
    engine = create_engine(WorkerSettings(engine=EngineKind.MOCKER, role=EngineRole.PREFILL))
    assert isinstance(engine, BatchingEngine) and engine.kind == "mocker"
    assert engine.role is EngineRole.PREFILL
    assert isinstance(engine, StepMetricsSource)
    assert not isinstance(engine, KvBlockTransfer)
    assert isinstance(engine, GuidedDecoder) and engine.guided_kinds() == ()


def test_the_cpu_engine_transfers_kv_bytes() -> None:
    engine = create_engine(WorkerSettings(engine=EngineKind.CPU))
    assert engine.kind == "cpu"
    assert isinstance(engine, KvBlockTransfer) and isinstance(engine, StepMetricsSource)
