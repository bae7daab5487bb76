"""Weights mapped from the gms run in the engine's own Llama (no transformers): it computes the
same logits, bit for bit, as transformers' model through the paged KV cache, and a process that
maps the weights never imports transformers. The KV pools start as untouched zero pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from tests.fixtures.gms import running_gms
from tokenyard.common.gms import LockEvent, LockState, event_history, get_info
from tokenyard.worker.engines.cpu import llama
from tokenyard.worker.engines.cpu.attention import (
    ATTN_IMPLEMENTATION,
    BATCH_KWARG,
    DecodeGroup,
    PagedBatch,
    PrefillSpan,
    causal_mask_with_prefix,
)
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.kv_storage import KvGeometry, KvStorage
from tokenyard.worker.engines.cpu.model import LoadedModel, load_model, use_attention

pytestmark = pytest.mark.integration


def _storage(loaded: LoadedModel) -> KvStorage:
    g = loaded.geometry
    return KvStorage(16, KvGeometry(g.num_layers, g.num_kv_heads, g.head_dim, 16))


def _steps() -> list[tuple[list[int], list[int], PagedBatch]]:
    """Three packed steps over two requests: A (slots from 0) and B (slots from 128).

    1. A's prompt (20 tokens) and B's first chunk (9 tokens), side by side;
    2. B's second chunk (7 tokens, over its cached 9) and A's first decoded token;
    3. both decode (contexts of different lengths: padded and masked)."""
    a = list(range(1, 21))
    b = [1, 504, 3458, 282, 4649, 314, 2114, 30, 198, 6, 1015, 442, 7, 44, 9, 10]
    span = torch.arange
    out: list[tuple[list[int], list[int], PagedBatch]] = []

    def batch(
        write: torch.Tensor, prefills: tuple[PrefillSpan, ...], decode: DecodeGroup | None
    ) -> PagedBatch:
        return PagedBatch(torch.empty(0), torch.empty(0), write, prefills, decode)  # pools filled per model

    out.append(
        (
            a + b[:9],
            list(range(20)) + list(range(9)),
            batch(
                torch.cat([span(0, 20), span(128, 137)]),
                (PrefillSpan(0, 20, span(0, 20), None), PrefillSpan(20, 9, span(128, 137), None)),
                None,
            ),
        )
    )
    out.append(
        (
            [*b[9:], 42],
            [*range(9, 16), 20],
            batch(
                torch.cat([span(128 + 9, 128 + 16), torch.tensor([20])]),
                (PrefillSpan(0, 7, span(128, 144), causal_mask_with_prefix(7, 16)),),
                DecodeGroup(torch.tensor([7]), span(0, 21), 21, None),
            ),
        )
    )
    longest = 22
    slots = torch.zeros(2, longest, dtype=torch.int64)
    slots[0] = span(0, 22)
    slots[1, :17] = span(128, 145)
    visible = torch.arange(longest)[None, :] < torch.tensor([22, 17])[:, None]
    out.append(
        (
            [43, 44],
            [21, 16],
            batch(
                torch.tensor([21, 144]),
                (),
                DecodeGroup(torch.tensor([0, 1]), slots.flatten(), longest, visible[:, None, None, :]),
            ),
        )
    )
    return out


def _run(loaded: LoadedModel, storage: KvStorage) -> list[torch.Tensor]:
    logits = []
    for ids, positions, template in _steps():
        batch = PagedBatch(storage.k, storage.v, template.write_slots, template.prefills, template.decode)
        with torch.inference_mode():
            out: Any = loaded.model(
                input_ids=torch.tensor([ids]),
                position_ids=torch.tensor([positions]),
                use_cache=False,
                logits_to_keep=torch.arange(len(ids)),
                **{BATCH_KWARG: batch},
            )
        logits.append(out.logits)
    return logits


def test_mapped_weights_compute_what_transformers_computes_through_the_paged_cache() -> None:
    with running_gms() as gms:
        mapped = load_model(
            CpuEngineConfig(gms=True, gms_socket=gms.socket), attn_implementation=ATTN_IMPLEMENTATION
        )
        try:
            assert isinstance(mapped.model, llama.LlamaForCausalLM)
            reference = load_model(CpuEngineConfig(), attn_implementation=ATTN_IMPLEMENTATION)
            assert type(reference.model).__module__.startswith("transformers.")
            expected = _run(reference, _storage(reference))
            got = _run(mapped, _storage(mapped))
            for step, (e, g) in enumerate(zip(expected, got, strict=True)):
                assert torch.equal(e, g), f"step {step}: max difference {(e - g).abs().max().item()}"
            # Without the step's batch, the plain causal path: what transformers' sdpa computes.
            use_attention(mapped.model, "sdpa")
            use_attention(reference.model, "sdpa")
            prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
            with torch.inference_mode():
                assert torch.equal(mapped.model(prompt).logits, reference.model(prompt).logits)
        finally:
            mapped.gms_session.close()


def test_a_worker_that_publishes_or_maps_the_weights_never_imports_transformers() -> None:
    # The first worker on an empty gms has a child process load and publish; the worker itself,
    # like every later one, only maps.
    code = textwrap.dedent(
        """
        import sys
        from tokenyard.common.gms import get_info
        from tokenyard.worker.engines.cpu.attention import ATTN_IMPLEMENTATION
        from tokenyard.worker.engines.cpu.config import CpuEngineConfig
        from tokenyard.worker.engines.cpu.model import load_model

        config = CpuEngineConfig(gms=True, gms_socket=sys.argv[1], gms_timeout_s=60)
        loaded = load_model(config, attn_implementation=ATTN_IMPLEMENTATION)
        info = get_info(sys.argv[1])
        print(type(loaded.model).__module__, "transformers" in sys.modules, info.reader_count)
        """
    )
    with running_gms() as gms:
        for _ in range(2):  # publishes, then maps what is there
            done = subprocess.run(
                [sys.executable, "-c", code, gms.socket], capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.split() == [llama.__name__, "False", "1"]
        info = get_info(gms.socket)
        assert (info.state, info.allocation_count) == (LockState.COMMITTED, 1)
        assert [e.event for e in event_history(gms.socket)] == [
            LockEvent.RW_CONNECT,  # the worker, which lets go at once (nothing allocated)
            LockEvent.RW_ABORT,
            LockEvent.RW_CONNECT,  # the publisher
            LockEvent.RW_COMMIT,
            LockEvent.RO_CONNECT,
            LockEvent.RO_DISCONNECT,
            LockEvent.RO_CONNECT,
            LockEvent.RO_DISCONNECT,
        ]


def test_an_unsupported_architecture_is_left_to_transformers() -> None:
    config = {"model_type": "llama", "hidden_act": "silu", "rope_parameters": {"rope_type": "default"}}
    assert llama.supports(config)
    assert not llama.supports({**config, "model_type": "qwen2"})
    assert not llama.supports({**config, "hidden_act": "gelu"})
    assert not llama.supports({**config, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    assert not llama.supports({**config, "pretraining_tp": 2})


def _rss_kib() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Rss:"))


def test_kv_pools_are_zero_and_cost_no_memory_until_used() -> None:
    geometry = KvGeometry(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
    before = _rss_kib()
    storage = KvStorage(2048, geometry)  # 720 MiB of K and V
    assert _rss_kib() - before < 32 * 1024
    assert storage.k.dtype == storage.v.dtype == torch.float32
    assert not storage.k[:, :4096].any() and not storage.v[:, -4096:].any()
    storage.k[3, 17] = 1.5
    assert storage.k.sum().item() == 1.5 * 3 * 64
    assert _rss_kib() - before < 64 * 1024
