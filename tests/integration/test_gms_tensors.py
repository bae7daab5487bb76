"""Torch tensors through a real gms: published by a writer, viewed by readers without a copy,
read-only for them, and shared between names (tied weights)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.fixtures.gms import running_gms
from tokenyard.common.gms import GmsClient, LockMode, MetadataEntry
from tokenyard.common.gms.tensors import TENSOR_ALIGNMENT, TensorSpec, mapped_tensors, publish_tensors

pytestmark = pytest.mark.integration


def test_tensors_round_trip_without_copies() -> None:
    embed = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: stored once
        "norm.weight": torch.ones(5, dtype=torch.bfloat16),
        "steps": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0, 7),
        "strided": torch.arange(16, dtype=torch.float32).reshape(4, 4).t(),
    }
    with running_gms() as gms:
        with GmsClient.connect(gms.socket, LockMode.RW, timeout_s=5) as writer:
            allocation = publish_tensors(writer, tensors, prefix="t/")
            writer.put_metadata([MetadataEntry("config", allocation.allocation_id, 0, b"{}")])
            writer.commit()
        with GmsClient.connect(gms.socket, LockMode.RO, timeout_s=5) as reader:
            layout = reader.import_layout()
            mapped = mapped_tensors(reader, layout, prefix="t/")
            offsets = {e.key: e.offset for e in layout.metadata}
    assert sorted(mapped) == sorted(tensors)
    for name, tensor in tensors.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
    assert mapped["embed.weight"] is mapped["lm_head.weight"]
    assert offsets["t/embed.weight"] == offsets["t/lm_head.weight"]
    assert all(o % TENSOR_ALIGNMENT == 0 for o in offsets.values())
    # Views of one mapping, valid after the session ended: no tensor owns a copy.
    base = mapped["embed.weight"].data_ptr() - offsets["t/embed.weight"]
    assert all(mapped[n].data_ptr() - offsets[f"t/{n}"] == base for n in tensors if n != "empty")
    assert TensorSpec.decode(layout.entry("t/norm.weight").value) == TensorSpec("bfloat16", (5,))
    with pytest.raises(ValueError, match="not a tensor description"):
        TensorSpec.decode(b"{}")


def test_a_reader_cannot_write_shared_weights() -> None:
    with running_gms() as gms:
        with GmsClient.connect(gms.socket, LockMode.RW, timeout_s=5) as writer:
            publish_tensors(writer, {"w": torch.ones(4)})
            writer.commit()
        code = textwrap.dedent(
            f"""
            from tokenyard.common.gms import GmsClient, LockMode
            from tokenyard.common.gms.tensors import mapped_tensors
            reader = GmsClient.connect({gms.socket!r}, LockMode.RO, timeout_s=5)
            w = mapped_tensors(reader)["w"]
            print(float(w.sum()), flush=True)
            w.add_(1)
            print("wrote", flush=True)
            """
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        with GmsClient.connect(gms.socket, LockMode.RO, timeout_s=5) as reader:
            after = mapped_tensors(reader)["w"].clone()
    # The write faults (SIGSEGV) instead of changing what every reader sees.
    assert done.stdout.splitlines() == ["4.0"], done.stderr
    assert done.returncode == -11
    assert torch.equal(after, torch.ones(4))
