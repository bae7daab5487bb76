"""The CPU engine's weights through a real gms (``--cpu-gms``): the first load publishes them, the
next maps them read-only, both compute exactly what weights loaded from disk compute, and a
worker serves a real answer from mapped weights."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.fixtures.cpu import CPU, hf_tokenizer, prompt_of
from tests.fixtures.gms import running_gms
from tests.fixtures.worker import generate_request, running_worker
from tokenyard.api.worker.v1 import worker_pb2
from tokenyard.common.gms import GmsClient, LockMode, LockState, MetadataEntry, get_info
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.gms_weights import MODEL_KEY
from tokenyard.worker.engines.cpu.model import ModelLoadError, load_model
from tokenyard.worker.engines.mocker.config import MockerConfig

pytestmark = pytest.mark.integration


def _memfd_ranges() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:tokenyard-gms" in line:
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _in_gms_memory(tensor: torch.Tensor) -> bool:
    return any(lo <= tensor.data_ptr() < hi for lo, hi in _memfd_ranges())


@pytest.mark.slow
def test_the_first_load_publishes_and_the_next_maps_the_same_weights() -> None:
    with running_gms() as gms:
        config = CpuEngineConfig(gms=True, gms_socket=gms.socket)
        first = load_model(config)
        assert get_info(gms.socket).state is LockState.RO
        second = load_model(config)
        info = get_info(gms.socket)
        assert (info.state, info.reader_count, info.allocation_count) == (LockState.RO, 2, 1)
        from_disk = load_model(CpuEngineConfig())

        prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
        with torch.no_grad():
            expected = from_disk.model(prompt).logits
            assert torch.equal(first.model(prompt).logits, expected)
            assert torch.equal(second.model(prompt).logits, expected)
        for loaded in (first, second):
            params = dict(loaded.model.named_parameters(remove_duplicate=False))
            assert all(_in_gms_memory(p) for p in params.values())
            assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
            assert (loaded.eos_token_ids, loaded.geometry) == (from_disk.eos_token_ids, from_disk.geometry)
            assert loaded.weights_dir == from_disk.weights_dir
        # Both map one copy: the same pages, at different addresses.
        assert info.allocated_bytes < 2 * sum(p.numel() * 4 for p in from_disk.model.parameters())

        first.gms_session.close()
        second.gms_session.close()
        assert get_info(gms.socket).state is LockState.COMMITTED


def test_a_gms_holding_other_weights_is_refused() -> None:
    with running_gms() as gms:
        with GmsClient.connect(gms.socket, LockMode.RW, timeout_s=5) as writer:
            allocation = writer.allocate(64)
            value = json.dumps({"format": 1, "identity": "/models/another-model"}).encode()
            writer.put_metadata([MetadataEntry(MODEL_KEY, allocation.allocation_id, 0, value)])
            writer.commit()
        config = CpuEngineConfig(gms=True, gms_socket=gms.socket, gms_lock_mode="ro", gms_timeout_s=5)
        with pytest.raises(ModelLoadError, match="holds the weights of '/models/another-model'"):
            load_model(config)
        assert get_info(gms.socket).state is LockState.COMMITTED  # the refused reader let go
        missing = CpuEngineConfig(gms=True, gms_socket=gms.socket + ".absent", gms_timeout_s=5)
        with pytest.raises(ModelLoadError, match="--cpu-gms-socket"):
            load_model(missing)


async def test_a_cpu_worker_serves_from_weights_it_published_and_others_map_them() -> None:
    tokenizer: Any = hf_tokenizer()
    prompt = prompt_of(tokenizer, "What is the capital of France?")
    with running_gms() as gms:
        cpu = CPU.model_copy(update={"gms": True, "gms_socket": gms.socket})
        async with running_worker(MockerConfig(), engine="cpu", cpu=cpu) as w:
            request = generate_request("paris", prompt, 16)
            request.sampling.temperature = 0.0
            responses = await w.generate(request)
            # Guided decoding too: its vocabulary loads at this first guided request.
            constrained = generate_request("json", prompt_of(tokenizer, "Describe Paris as JSON."), 48)
            constrained.sampling.temperature = 0.0
            constrained.guided_decoding.kind = worker_pb2.GUIDED_DECODING_KIND_JSON_OBJECT
            structured = await w.generate(constrained)
            assert get_info(gms.socket).reader_count == 1
            # A second engine on the same gms maps the published copy instead of loading one.
            second = load_model(cpu)
            info = get_info(gms.socket)
            assert (info.reader_count, info.allocation_count) == (2, 1)
            assert all(_in_gms_memory(p) for p in second.model.parameters())
            second.gms_session.close()
    assert "Paris" in tokenizer.decode([t for r in responses for t in r.token_ids])
    assert structured[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    document = tokenizer.decode([t for r in structured for t in r.token_ids], skip_special_tokens=True)
    assert isinstance(json.loads(document), dict)
