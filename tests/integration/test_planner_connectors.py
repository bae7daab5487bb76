"""The virtual connector (decisions in discovery, acknowledged by an outside agent) and the local
connector (real worker processes: started, ready, drained, stopped)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tokenyard.common.discovery import Instance, ModelCard, new_instance_id, open_discovery
from tokenyard.planner.connectors import ConnectorError, count_workers
from tokenyard.planner.connectors.local import LocalConnector, LocalOptions
from tokenyard.planner.connectors.virtual import VirtualAgent, VirtualConnector
from tokenyard.planner.pools import Pool

pytestmark = pytest.mark.integration


def worker(role: str) -> Instance:
    card = ModelCard("m", "t", 16, 1024, 64, "mocker", role)
    return Instance(new_instance_id(), "worker", role, "127.0.0.1:1", model_card=card)


async def test_virtual_decisions_wait_for_the_agents_acknowledgement() -> None:
    url = f"memory://planner-virtual-{uuid.uuid4().hex}"
    planner_side, agent_side = open_discovery(url), open_discovery(url)
    try:
        for role in ("prefill", "decode", "decode"):
            await agent_side.register(worker(role))
        connector = VirtualConnector(
            planner_side, lambda: "127.0.0.1:8200", poll_interval_s=0.02, max_wait_s=5
        )
        assert await connector.current_replicas() == {Pool.AGGREGATED: 0, Pool.PREFILL: 1, Pool.DECODE: 2}
        agent = VirtualAgent(agent_side)
        scaling = asyncio.create_task(connector.scale({Pool.PREFILL: 2, Pool.DECODE: 3}, decision_id=4))
        decision = await agent.wait_for_decision(after=0, timeout=5)
        assert decision.decision_id == 4 and decision.replicas == {Pool.PREFILL: 2, Pool.DECODE: 3}
        await asyncio.sleep(0.1)
        assert not scaling.done()  # not before the agent says so
        await agent.acknowledge(4)
        await asyncio.wait_for(scaling, 5)
        # A later decision replaces the record; an older acknowledgement does not count for it.
        nxt = asyncio.create_task(connector.scale({Pool.PREFILL: 1, Pool.DECODE: 1}, decision_id=5))
        assert (await agent.wait_for_decision(after=4, timeout=5)).decision_id == 5
        await asyncio.sleep(0.1)
        assert not nxt.done()
        await agent.acknowledge(5)
        await asyncio.wait_for(nxt, 5)
        await connector.close()
        assert await agent.latest() is None
    finally:
        await planner_side.close()
        await agent_side.close()


async def test_virtual_gives_up_without_an_agent() -> None:
    discovery = open_discovery(f"memory://planner-virtual-{uuid.uuid4().hex}")
    try:
        connector = VirtualConnector(
            discovery, lambda: "127.0.0.1:8200", poll_interval_s=0.02, max_wait_s=0.1
        )
        with pytest.raises(ConnectorError, match="no scaling agent acknowledged decision 9 within 0s"):
            await connector.scale({Pool.AGGREGATED: 2}, 9)
    finally:
        await discovery.close()


@pytest.mark.timeout(180)
async def test_local_starts_drains_and_stops_worker_processes(tmp_path: Path) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    discovery = open_discovery(url)
    options = LocalOptions(
        engine="mocker",
        model="SmolLM2-135M-Instruct",
        host="127.0.0.1",
        discovery=url,
        state_dir=tmp_path / "workers",
        log_level="warning",
        extra_args=("--mocker-num-gpu-blocks", "64"),
        max_workers=2,
        drain_grace_s=2.0,
        ready_timeout_s=120.0,
    )
    local = LocalConnector(options, discovery)
    try:
        assert await local.current_replicas() == {Pool.AGGREGATED: 0, Pool.PREFILL: 0, Pool.DECODE: 0}
        await local.scale({Pool.AGGREGATED: 1, Pool.DECODE: 1}, 1)
        counts = await count_workers(discovery)
        assert counts[Pool.AGGREGATED] == 1 and counts[Pool.DECODE] == 1
        started = local.own_workers[Pool.DECODE][0]
        assert started.running and started.pid_path.exists()
        # More than --local-max-workers: refused with the reason, after starting what fits.
        with pytest.raises(ConnectorError, match="may run 2 workers at most"):
            await local.scale({Pool.AGGREGATED: 2, Pool.DECODE: 1}, 2)
        await local.scale({Pool.AGGREGATED: 1, Pool.DECODE: 0}, 3)
        assert not started.running and not started.pid_path.exists()
        assert (await count_workers(discovery))[Pool.DECODE] == 0
        # Workers the planner did not start are never stopped.
        foreign = worker("aggregated")
        await discovery.register(foreign)
        with pytest.raises(ConnectorError, match="only 1 of the 2 workers were started by the planner"):
            await local.scale({Pool.AGGREGATED: 0}, 4)
        await discovery.deregister(foreign.instance_id)
    finally:
        await local.close()
        await discovery.close()
    assert all(not w for w in local.own_workers.values())


async def test_local_reports_a_worker_that_cannot_start(tmp_path: Path) -> None:
    url = f"dir://{tmp_path / 'discovery'}"
    discovery = open_discovery(url)
    options = LocalOptions(
        engine="mocker",
        model="m",
        host="127.0.0.1",
        discovery=url,
        state_dir=tmp_path / "w",
        extra_args=("--no-such-flag",),
        ready_timeout_s=60.0,
    )
    local = LocalConnector(options, discovery)
    try:
        with pytest.raises(
            ConnectorError,
            match=r"(?s)aggregated worker did not start: .*exited with code 2.*unknown flag --no-such-flag",
        ):
            await local.scale({Pool.AGGREGATED: 1}, 1)
        assert local.own_workers[Pool.AGGREGATED] == []
    finally:
        await local.close()
        await discovery.close()
