"""``--engine vllm`` where vLLM is not installed (the main environment): one line that names the
missing package and how to get it, never a traceback. The vLLM engine itself is tested by
``make test-vllm`` (tests/vllm, in .venv-vllm)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.fixtures.processes import run_to_exit
from tokenyard.common.service import StartupError
from tokenyard.worker.config import WorkerSettings
from tokenyard.worker.engines import EngineKind, create_engine
from tokenyard.worker.engines.base import EngineRole

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here"),
]


def test_create_engine_names_the_missing_package() -> None:
    with pytest.raises(StartupError) as raised:
        create_engine(WorkerSettings(engine=EngineKind.VLLM))
    message = str(raised.value)
    assert "'vllm'" in message and "not installed" in message and "make test-vllm" in message
    assert "\n" not in message


def test_a_vllm_worker_process_exits_with_one_line() -> None:
    result = run_to_exit(["worker", "--engine", "vllm", "--port", "0", "--metrics-port", "0"])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "'vllm'" in lines[0], result.stderr


def test_the_vllm_engine_refuses_disaggregated_roles_before_anything_else() -> None:
    with pytest.raises(StartupError, match="aggregated role only"):
        create_engine(WorkerSettings(engine=EngineKind.VLLM, role=EngineRole.PREFILL))
