"""The vLLM engine's tests share one deployment for the whole session (a vLLM start takes tens of
seconds on two cores): a router process in kv mode, and in this process a worker running the
vLLM engine and a frontend, meeting in a discovery directory.

Run them with ``make test-vllm`` (``.venv-vllm/bin/pytest -m vllm tests/vllm``). Nothing here
imports vLLM at module level: the main environment collects these modules without it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio

from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.vllm import VLLM, Stack
from tests.fixtures.worker import MODEL, eventually
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer
from tokenyard.worker.config import WorkerSettings
from tokenyard.worker.engines import EngineKind
from tokenyard.worker.server import WorkerServer

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    # vLLM's engine client never terminates the ZMQ context under its asyncio one (vllm
    # v1/engine/core_client.py, MPClient); pyzmq warns when the session's last collection finds it.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Exception ignored in. <function Context.__del__:pytest.PytestUnraisableExceptionWarning",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here needs vLLM, shares the session's event loop (the deployment lives on it),
    and tolerates the deprecation warnings vLLM and torch raise on import."""
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(pytest.mark.vllm)
        # Ahead of the marker auto mode gave it, which names the function's own loop.
        item.add_marker(pytest.mark.asyncio(loop_scope="session"), append=False)
        item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))
        item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
        item.add_marker(pytest.mark.filterwarnings("ignore::ResourceWarning"))
        item.add_marker(pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"))
        item.add_marker(pytest.mark.timeout(1200))


@pytest.fixture(scope="session", autouse=True)
def _needs_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here: run `make test-vllm`")


@pytest.fixture(scope="session")
def vllm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def router_proc(vllm_root: Path) -> Iterator[ServiceProcess]:
    discovery = f"dir://{vllm_root / 'discovery'}"
    proc = ServiceProcess(
        ["router", "--port", "0", "--metrics-port", "0", "--discovery", discovery, "--mode", "kv"],
        vllm_root / "router.log",
    )
    yield proc
    proc.terminate()
    proc.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stack(vllm_root: Path, router_proc: ServiceProcess) -> AsyncIterator[Stack]:
    discovery = f"dir://{vllm_root / 'discovery'}"
    router = await wait_for_instance(discovery, "router", proc=router_proc)
    settings = WorkerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        discovery=discovery,
        grace_period=2.0,
        model=MODEL,
        engine=EngineKind.VLLM,
        vllm=VLLM,
    )
    frontend_settings = FrontendSettings(
        host="127.0.0.1", port=0, http_port=0, discovery=discovery, grace_period=1.0
    )
    async with WorkerServer(settings) as worker, FrontendServer(frontend_settings) as frontend:
        s = Stack(vllm_root, discovery, worker, frontend, router.address)
        async with s.openai() as client:

            async def served() -> bool:
                try:
                    await client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
                except openai.APIStatusError:
                    return False
                return True

            await eventually(served, "the frontend routes to the vLLM worker", timeout=60)
        yield s


@pytest.fixture(scope="session")
def tokenizer(stack: Stack) -> Any:
    """The Hugging Face tokenizer of the folder vLLM serves."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stack.engine.model_folder)
