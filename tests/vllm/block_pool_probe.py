"""Checks the KV event translation against vLLM's own block pool (run by test_kv_index.py).

    python tests/vllm/block_pool_probe.py MODEL_FOLDER

Runs vLLM's offline engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that its
scheduler's block pool can be read, with a pool of 40 blocks of 32 tokens so that a randomized
workload (batches of prompts sharing prefixes, varying lengths) makes it evict, and copies of a
block appear when prompts of one batch share a prefix. After every batch the KV events vLLM
published are translated (:class:`~tokenyard.worker.engines.vllm.kv_translate.KvEventTranslator`)
and the hashes the translator holds, plus the orphans it keeps aside, are compared with the keys
of vLLM's block pool. Prints one JSON line per batch, then a summary line.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from typing import Any

BLOCK = 32
POOL_BLOCKS = 40
BATCHES = 10


def main() -> int:
    folder = sys.argv[1]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import msgspec
    import zmq
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.v1.core.kv_cache_utils import get_block_hash, maybe_convert_block_hash

    from tokenyard.worker.engines.vllm.kv_translate import KvEventTranslator
    from tokenyard.worker.kv_events import KvEventData

    workdir = tempfile.mkdtemp(prefix="tokenyard-probe-")
    endpoint = f"ipc://{workdir}/events"
    ctx: Any = zmq.Context()
    sub: Any = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    decoder: Any = msgspec.msgpack.Decoder(type=KVEventBatch)
    published: list[KvEventData] = []
    translator = KvEventTranslator(BLOCK, published.append)

    one_block = 30 * 2 * 3 * 64 * 4 * BLOCK  # SmolLM2: layers x K,V x kv heads x head dim x float32
    llm: Any = LLM(
        model=folder,
        dtype="float32",
        enforce_eager=True,
        block_size=BLOCK,
        enable_prefix_caching=True,
        max_model_len=512,
        max_num_seqs=8,
        kv_cache_memory_bytes=one_block * POOL_BLOCKS,
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint),
    )
    pool: Any = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    next_seq = 0

    def drain() -> None:
        nonlocal next_seq
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.5:
            if sub.poll(50):
                _, seq, payload = sub.recv_multipart()
                assert int.from_bytes(seq, "big") == next_seq, "a KV event batch was lost"
                next_seq += 1
                translator.apply(decoder.decode(payload).events)
                quiet_since = time.monotonic()

    def held_by_vllm() -> set[Any]:
        return {
            maybe_convert_block_hash(get_block_hash(key)) for key in pool.cached_block_hash_to_block._cache
        }

    rng = random.Random(7)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(rng.choice([40, 70, 100, 130]))] for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    all_equal = True
    for batch in range(BATCHES):
        prompts = []
        for _ in range(rng.randint(2, 6)):
            tokens = rng.choice(prefixes) + [rng.randrange(1000, 40000) for _ in range(rng.randint(0, 80))]
            prompts.append({"prompt_token_ids": tokens})
        llm.generate(prompts, params, use_tqdm=False)
        drain()
        ours = translator.vllm_hashes() | translator.orphan_hashes()
        theirs = held_by_vllm()
        equal = ours == theirs
        all_equal = all_equal and equal
        print(
            json.dumps(
                {
                    "batch": batch,
                    "vllm_blocks": len(theirs),
                    "translated": len(translator),
                    "orphans": len(translator.orphan_hashes()),
                    "equal": equal,
                    "missing": len(theirs - ours),
                    "extra": len(ours - theirs),
                }
            ),
            flush=True,
        )
    stats = translator.stats
    print(
        json.dumps(
            {
                "summary": True,
                "all_equal": all_equal,
                "stored": stats.stored_blocks,
                "removed": stats.removed_blocks,
                "duplicates": stats.duplicate_copies,
                "orphaned": stats.orphaned_blocks,
                "unknown_parents": stats.unknown_parents,
                "published_events": len(published),
            }
        ),
        flush=True,
    )
    sub.close(linger=0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
