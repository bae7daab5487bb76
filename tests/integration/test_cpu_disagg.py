"""Disaggregated serving with the real CPU engine (SmolLM2-135M-Instruct): a prefill worker computes
the prompt, a decode worker pulls its KV over gRPC and continues, and the greedy output is the one
an aggregated worker produces. Plus the ways a transfer fails: the prefill worker gone, the
transfer expired; and a transfer nobody fetches, freed by the hold timeout.

Workers are in-process (real gRPC servers on loopback ephemeral ports), one CPU engine each with
its own copy of the weights, except the prefill worker that is killed: a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fixtures.cpu import CHAT_QUESTIONS, hf_tokenizer, prompt_of
from tests.fixtures.processes import ServiceProcess, wait_for_instance
from tests.fixtures.worker import RunningWorker, eventually, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration

BS = 16
MAX_TOKENS = 12
# One torch thread per engine: two or three engines share the machine's cores.
CPU = CpuEngineConfig(num_kv_blocks=256, num_threads=1)
# The second question is long enough to span many blocks.
QUESTIONS = [
    CHAT_QUESTIONS[0],
    "Summarise this in one sentence: The committee met on Tuesday to review the budget for the "
    "coming year. After a long debate about the cost of repairing the old bridge, the members agreed "
    "to split the work over two years, to ask the region for a grant, and to publish the plan so that "
    "residents can comment on it before the final vote in the spring.",
    *CHAT_QUESTIONS[2:],
]
REASONS = (
    "unreachable",
    "not_found",
    "timeout",
    "layout_mismatch",
    "invalid_response",
    "unsupported",
    "error",
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return hf_tokenizer()


@contextlib.asynccontextmanager
async def cpu_worker(role: str, **overrides: Any) -> AsyncIterator[RunningWorker]:
    cpu = CPU.model_copy(update=overrides.pop("cpu", {}))
    async with running_worker(
        MockerConfig(), engine="cpu", cpu=cpu, role=role, load_interval=0.05, **overrides
    ) as w:
        yield w


def metric(worker: RunningWorker, name: str) -> float:
    text = worker.server.runtime.metrics.render()[0].decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def fallbacks(worker: RunningWorker) -> dict[str, float]:
    counts = {
        r: metric(worker, f'tokenyard_worker_kv_transfer_fallbacks_total{{reason="{r}"}}') for r in REASONS
    }
    return {r: n for r, n in counts.items() if n}


def greedy(
    request_id: str, prompt: Sequence[int], max_tokens: int = MAX_TOKENS
) -> worker_pb2.GenerateRequest:
    request = generate_request(request_id, prompt, max_tokens)
    request.sampling.temperature = 0.0
    return request


def tokens_of(responses: list[worker_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


async def prefill(
    worker: RunningWorker, request_id: str, prompt: Sequence[int]
) -> tuple[int, worker_pb2.KvTransferParams]:
    request = greedy(request_id, prompt)
    request.disaggregation.prefill_only = True
    responses = await worker.generate(request)
    (first,) = tokens_of(responses)
    return first, responses[-1].kv_transfer


def decode_request(
    request_id: str, prompt: Sequence[int], transfer: worker_pb2.KvTransferParams
) -> worker_pb2.GenerateRequest:
    request = greedy(request_id, prompt)
    request.disaggregation.kv_transfer.CopyFrom(transfer)
    return request


async def stored_hashes(worker: RunningWorker, into: set[int]) -> None:
    """Collect the block hashes of every ``stored`` event on the worker's KV stream (until cancelled)."""
    call: Any = worker.stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest(dp_rank=0))
    try:
        async for message in call:
            if message.WhichOneof("payload") == "events":
                for event in message.events.events:
                    if event.WhichOneof("data") == "stored":
                        into.update(b.block_hash for b in event.stored.blocks)
    finally:
        call.cancel()


# -- (a, b) the same greedy output, the imported blocks announced --------------------------------


async def check_disaggregated(questions: list[str], tokenizer: Any) -> None:
    prompts = [prompt_of(tokenizer, q) for q in questions]
    async with cpu_worker("aggregated") as a, cpu_worker("prefill") as p, cpu_worker("decode") as d:
        announced: set[int] = set()
        watcher = asyncio.create_task(stored_hashes(d, announced))
        transferred: set[int] = set()
        try:
            for i, prompt in enumerate(prompts):
                aggregated = tokens_of(await a.generate(greedy(f"agg-{i}", prompt)))
                first, transfer = await prefill(p, f"q{i}", prompt)
                assert first == aggregated[0], f"prompt {i}: the prefill worker's token"
                assert transfer.num_tokens == len(prompt) and len(transfer.block_hashes) == len(prompt) // BS
                transferred.update(transfer.block_hashes)

                responses = await d.generate(decode_request(f"q{i}", prompt, transfer))
                assert tokens_of(responses) == aggregated, f"prompt {i}: {questions[i]!r}"
                # The decode worker computed none of the prompt's blocks it could take over: at
                # least the last token is computed here, for its logits.
                usable = min(len(transfer.block_hashes), (len(prompt) - 1) // BS)
                assert responses[-1].usage.cached_tokens == usable * BS > 0, f"prompt {i}"
            assert fallbacks(d) == {}
            assert await p.active_blocks() == 0  # every transfer fetched and released
            received = metric(d, 'tokenyard_worker_kv_transfer_blocks_total{direction="received"}')
            assert len(prompts) <= received <= sum(len(p) // BS for p in prompts)

            async def all_announced() -> bool:
                return transferred <= announced

            await eventually(all_announced, "the decode worker's KV events name every transferred block")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_disaggregated_greedy_output_equals_aggregated(tokenizer: Any) -> None:
    await check_disaggregated(QUESTIONS[:3], tokenizer)


@pytest.mark.slow
async def test_disaggregated_greedy_output_equals_aggregated_twenty_prompts(tokenizer: Any) -> None:
    await check_disaggregated(QUESTIONS, tokenizer)


# -- (c, d) failures ---------------------------------------------------------------------------


async def test_a_stopped_prefill_worker_or_an_expired_transfer_means_local_prefill(tokenizer: Any) -> None:
    prompt = prompt_of(tokenizer, QUESTIONS[1])
    async with cpu_worker("decode") as d:
        async with cpu_worker("prefill") as p:
            _, transfer = await prefill(p, "gone", prompt)
        reference = tokens_of(await d.generate(greedy("reference", prompt)))
        d.server.engine.reset_prefix_cache()  # type: ignore[attr-defined]

        responses = await d.generate(decode_request("gone", prompt, transfer))
        assert tokens_of(responses) == reference
        assert responses[-1].usage.cached_tokens == 0
        assert fallbacks(d) == {"unreachable": 1}

        async with cpu_worker("prefill", cpu={"kv_transfer_hold_s": 0.5}) as p:
            _, transfer = await prefill(p, "late", prompt)
            assert await p.active_blocks() > 0

            # (d) Nobody fetched it: the hold timeout frees the blocks.
            async def freed() -> bool:
                return (
                    await p.active_blocks() == 0
                    and metric(p, "tokenyard_worker_kv_transfers_expired_total") == 1
                )

            await eventually(freed, "the unfetched transfer freed by the hold timeout")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in p.stub.FetchKvBlocks(
                    worker_pb2.FetchKvBlocksRequest(transfer_id="late"), timeout=5
                ):
                    pass
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'late'" in (err.value.details() or "")

            d.server.engine.reset_prefix_cache()  # type: ignore[attr-defined]
            responses = await d.generate(decode_request("late", prompt, transfer))
            assert tokens_of(responses) == reference
            assert fallbacks(d) == {"unreachable": 1, "not_found": 1}

        # Garbage parameters are the caller's error, not a fallback.
        bad = decode_request("bad", prompt, transfer)
        bad.disaggregation.kv_transfer.num_tokens = len(prompt) + 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.generate(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "num_tokens" in (err.value.details() or "")


async def test_a_killed_prefill_process_means_local_prefill(tokenizer: Any, tmp_path: Path) -> None:
    prompt = prompt_of(tokenizer, QUESTIONS[1])
    folder = Path("/tmp/disagg-worker") / uuid.uuid4().hex
    folder.mkdir(parents=True)
    discovery = f"dir://{folder}"
    proc = ServiceProcess(
        [
            "worker",
            "--engine=cpu",
            "--role=prefill",
            "--host=127.0.0.1",
            "--port=0",
            "--metrics-port=0",
            f"--discovery={discovery}",
            "--cpu-num-kv-blocks=64",
            "--cpu-num-threads=1",
        ],
        tmp_path / "prefill.log",
    )
    try:
        instance = await wait_for_instance(discovery, "worker", timeout=120, proc=proc)
        async with cpu_worker("decode") as d, grpc.aio.insecure_channel(instance.address) as channel:
            from tokenyard.api.worker.v1 import worker_pb2_grpc

            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            request = greedy("killed", prompt)
            request.disaggregation.prefill_only = True
            responses = [r async for r in stub.Generate(request, timeout=60)]
            transfer = responses[-1].kv_transfer
            assert transfer.source_address == instance.address
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)

            responses = await d.generate(decode_request("killed", prompt, transfer))
            assert tokens_of(responses) == tokens_of(await d.generate(greedy("reference", prompt)))
            assert fallbacks(d) == {"unreachable": 1}
    finally:
        proc.close()
        shutil.rmtree(folder, ignore_errors=True)
