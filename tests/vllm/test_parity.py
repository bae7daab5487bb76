"""Greedy output through Tokenyard (a worker running the vLLM engine, over its gRPC contract)
equals vLLM's own offline ``LLM.generate`` on the same converted model with the same settings,
token for token, for 20 chat prompts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fixtures.vllm import Stack, chat_prompt, child_env
from tests.fixtures.worker import MODEL
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.",
    "What language is spoken in Brazil?",
    "List two planets closer to the Sun than Earth.",
    "What does a thermometer measure?",
    "Translate 'good morning' into Spanish.",
    "What is the largest ocean on Earth?",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What is the opposite of cold?",
    "How many days are in a leap year?",
    "What do bees make?",
    "Describe a rainbow in a few words.",
]


async def test_greedy_output_equals_vllms_offline_engine(
    stack: Stack, tokenizer: Any, tmp_path: Path
) -> None:
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS]
    # Its own cache salt per prompt: no prefix-cache hit on either side, so both compute each
    # prompt from scratch, one request at a time.
    salts = [f"parity-{i}" for i in range(len(prompts))]
    ours: list[list[int]] = []
    async with grpc.aio.insecure_channel(stack.worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for i, (prompt, salt) in enumerate(zip(prompts, salts, strict=True)):
            request = worker_pb2.GenerateRequest(
                request_id=f"parity-{i}", model=MODEL, token_ids=prompt, cache_salt=salt
            )
            request.stop.max_tokens = MAX_TOKENS
            request.sampling.temperature = 0.0
            responses = [r async for r in stub.Generate(request, timeout=120)]
            ours.append([t for r in responses for t in r.token_ids])
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps({"prompts": prompts, "salts": salts, "max_tokens": MAX_TOKENS}))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(HERE / "offline_reference.py"), str(stack.engine.model_folder), str(spec)],
        capture_output=True,
        text=True,
        timeout=540,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    theirs = json.loads(result.removeprefix("RESULT "))["outputs"]
    mismatches = [
        (QUESTIONS[i], tokenizer.decode(a), tokenizer.decode(b))
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
        if a != b
    ]
    assert not mismatches, mismatches
    assert "Paris" in tokenizer.decode(ours[0])
