"""A caller that reaches a worker directly, past the frontend and its limits: the worker bounds what
it is sent itself, and a refused request leaves nothing running."""

from __future__ import annotations

import grpc
import pytest

from tests.fixtures.worker import RunningWorker, generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.worker.engines.mocker.config import MockerConfig
from tokenyard.worker.request_bounds import MAX_ANNOTATIONS, MAX_ID_CHARS, MAX_STOP_TOKEN_IDS

pytestmark = pytest.mark.integration

CONTEXT = 512
MOCKER = MockerConfig(block_size=16, num_gpu_blocks=256, speedup_ratio=0, max_model_len=CONTEXT)


async def _refused(w: RunningWorker, request: worker_pb2.GenerateRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    return err.value.details() or ""


async def test_a_direct_caller_is_held_to_the_workers_own_limits() -> None:
    async with running_worker(MOCKER) as w:
        prompt = list(range(1, 9))
        assert "context length" in await _refused(w, generate_request("long", list(range(CONTEXT)), 4))
        assert "request_id" in await _refused(w, generate_request("r" * (MAX_ID_CHARS + 1), prompt, 4))
        stop_ids = list(range(MAX_STOP_TOKEN_IDS + 1))
        assert "stop_token_ids" in await _refused(
            w, generate_request("stops", prompt, 4, stop_token_ids=stop_ids)
        )
        assert "min_tokens" in await _refused(w, generate_request("minmax", prompt, 4, min_tokens=5))
        assert "min_tokens" in await _refused(w, generate_request("minctx", prompt, min_tokens=CONTEXT))
        many = generate_request("notes", prompt, 4)
        for i in range(MAX_ANNOTATIONS + 1):
            many.annotations[f"k{i}"] = "v"
        assert "annotations" in await _refused(w, many)
        salted = generate_request("salt", prompt, 4)
        salted.cache_salt = "s" * (MAX_ID_CHARS + 1)
        assert "cache_salt" in await _refused(w, salted)
        assert await w.active_blocks() == 0
        # Within the limits the same worker serves.
        done = await w.generate(generate_request("fine", prompt, 4, stop_token_ids=[1, 2], min_tokens=2))
        assert done[-1].usage.completion_tokens == 4
