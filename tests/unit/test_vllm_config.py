"""The vLLM engine's settings and `tokenyard up`'s core split for vLLM workers (no vLLM needed)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from tokenyard.deploy.up import UpSettings, plan, vllm_core_sets
from tokenyard.worker.engines.vllm.config import VllmEngineConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "endpoint", ["tcp://*:5557", "tcp://0.0.0.0:5557", "tcp://10.0.0.3:5557", "inproc://x"]
)
def test_kv_events_are_never_published_on_a_routable_address(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="--vllm-kv-events-endpoint"):
        VllmEngineConfig(kv_events_endpoint=endpoint)


@pytest.mark.parametrize("endpoint", ["", "ipc:///tmp/ty/kv", "tcp://127.0.0.1:18555"])
def test_local_kv_event_endpoints_are_accepted(endpoint: str) -> None:
    assert VllmEngineConfig(kv_events_endpoint=endpoint).kv_events_endpoint == endpoint


def test_blocks_default_to_what_vllms_cpu_kernels_take() -> None:
    assert VllmEngineConfig().block_size % 32 == 0


def test_vllm_workers_of_one_machine_get_cores_of_their_own() -> None:
    cores = sorted(os.sched_getaffinity(0))
    assert vllm_core_sets(1) == []
    sets = vllm_core_sets(len(cores))
    assert sorted(int(c) for s in sets for c in s.split(",")) == cores
    assert vllm_core_sets(len(cores) + 1) == ["nobind"] * (len(cores) + 1)


def test_up_passes_each_vllm_worker_its_cores() -> None:
    workers = min(2, len(os.sched_getaffinity(0)))
    children = plan(UpSettings(engine="vllm", workers=workers))
    binds = [
        c.argv[c.argv.index("--vllm-omp-threads-bind") + 1]
        for c in children
        if "--vllm-omp-threads-bind" in c.argv
    ]
    assert binds == vllm_core_sets(workers)
