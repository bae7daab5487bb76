"""The router's KV index mirrors what vLLM holds cached.

After a randomized workload through the frontend (prompts sharing prefixes, varying lengths,
concurrent, in a pool small enough that vLLM evicts), the router's index dump equals the blocks
the worker's engine holds (its translation of vLLM's events) and the worker's own snapshot; then
vLLM's prefix-cache hits on further prompts equal what that index predicts. A helper process runs
vLLM in-process to compare the translation with vLLM's block pool itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import grpc

from tests.fixtures.vllm import Stack, child_env
from tests.fixtures.worker import MODEL, eventually
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.hashing import block_hashes

HERE = Path(__file__).resolve().parent


def random_workload(rng: random.Random, requests: int) -> list[tuple[list[int], int]]:
    """``(prompt token ids, max tokens)``: one of five shared prefixes, then tokens of its own."""
    prefixes = [[rng.randrange(1000, 40000) for _ in range(rng.randint(40, 400))] for _ in range(5)]
    return [
        (
            rng.choice(prefixes) + [rng.randrange(1000, 40000) for _ in range(rng.randint(0, 120))],
            rng.randint(1, 24),
        )
        for _ in range(requests)
    ]


async def worker_snapshot(stack: Stack) -> set[int]:
    """The blocks in the first message of a fresh KV event stream (the worker's snapshot)."""
    async with grpc.aio.insecure_channel(stack.worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        call = stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest(), timeout=30)
        blocks: set[int] = set()
        async for message in call:
            if not message.HasField("snapshot"):
                break
            for chain in message.snapshot.chains:
                blocks.update(block.block_hash for block in chain.stored.blocks)
            if not message.snapshot.has_more:
                break
        call.cancel()
        return blocks


async def settled(stack: Stack) -> None:
    """The router's index and the engine agree (vLLM's events travel apart from its outputs)."""

    async def same() -> bool:
        engine_view: set[int] = stack.engine.cached_block_hashes()
        return await stack.router_blocks() == engine_view

    await eventually(same, "the router's index equals the engine's view of vLLM's cache", timeout=30)


async def test_after_a_random_workload_the_router_index_is_what_vllm_holds(stack: Stack) -> None:
    engine = stack.engine
    rng = random.Random(11)
    work = random_workload(rng, 48)
    gate = asyncio.Semaphore(4)
    async with stack.openai() as client:

        async def run(prompt: list[int], max_tokens: int) -> None:
            async with gate:
                await client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0
                )

        await asyncio.gather(*(run(p, n) for p, n in work))
    await settled(stack)
    router = await stack.router_blocks()
    assert router == engine.cached_block_hashes() == await worker_snapshot(stack)
    assert len(router) > 20
    stats = engine.translator.stats
    assert stats.removed_blocks > 0, stats  # the workload outgrew the pool: vLLM evicted
    assert stats.unknown_parents == 0 and engine.lost_event_batches == 0, stats

    # vLLM's own prefix matching agrees with the index: a prompt's cached tokens are the blocks
    # of it the index holds (whole blocks; the last prompt token is always computed).
    async with grpc.aio.insecure_channel(stack.worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for i, (prompt, _) in enumerate(rng.sample(work, 8)):
            prompt = prompt[: rng.randint(33, len(prompt))] if len(prompt) > 33 else prompt
            held = engine.cached_block_hashes()
            _, chain = block_hashes(prompt, 32)
            leading = next((k for k, h in enumerate(chain) if h not in held), len(chain))
            expected = min(leading * 32, (len(prompt) - 1) // 32 * 32)
            request = worker_pb2.GenerateRequest(request_id=f"probe-{i}", model=MODEL, token_ids=prompt)
            request.stop.max_tokens = 1
            responses = [r async for r in stub.Generate(request, timeout=60)]
            assert responses[-1].usage.cached_tokens == expected, (i, len(prompt), leading)
            await settled(stack)


async def test_the_translation_equals_vllms_block_pool(stack: Stack) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(HERE / "block_pool_probe.py"), str(stack.engine.model_folder)],
        capture_output=True,
        text=True,
        timeout=900,
        env=child_env(),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = lines[-1]
    assert summary["summary"] and summary["all_equal"], lines
    assert summary["removed"] > 0 and summary["unknown_parents"] == 0, summary
    assert all(line["equal"] for line in lines[:-1]), lines
