"""Torch tensors in gms memory: publish a set of named tensors, and view a committed layout as
tensors without copying. torch is imported here only, when these functions run.

Each tensor is a metadata entry ``<prefix><name> -> (allocation, offset, {"dtype", "shape"})``;
all of them share one allocation, each at an offset aligned to :data:`TENSOR_ALIGNMENT`. Tensors
that share storage (tied weights) are stored once and come back as one tensor under both names.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenyard.common.gms.client import GmsClient
from tokenyard.common.gms.types import Allocation, Layout, MetadataEntry

if TYPE_CHECKING:
    import mmap

    import torch

# Cache lines and every SIMD load the CPU kernels issue stay aligned.
TENSOR_ALIGNMENT = 64


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: str
    """A torch dtype name without the module, e.g. ``float32``."""
    shape: tuple[int, ...]

    def encode(self) -> bytes:
        return json.dumps({"dtype": self.dtype, "shape": list(self.shape)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> TensorSpec:
        try:
            raw = json.loads(value)
            dtype, shape = raw["dtype"], raw["shape"]
            if not isinstance(dtype, str) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"not a tensor description: {value[:80]!r}") from None
        return cls(dtype, tuple(shape))


def _dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def _align(n: int) -> int:
    return -(-n // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT


def publish_tensors(
    client: GmsClient, tensors: Mapping[str, torch.Tensor], *, prefix: str = ""
) -> Allocation:
    """Copy ``tensors`` into one new allocation and record where each lies (writer only; the
    caller commits). Returns the allocation."""
    regions: dict[tuple[int, int, str, tuple[int, ...], tuple[int, ...]], int] = {}
    placed: list[tuple[str, torch.Tensor, int]] = []
    size = 0
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}, not the CPU")
        key = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            str(tensor.dtype),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        offset = regions.get(key)
        if offset is None:
            offset = regions[key] = size
            size = _align(size + tensor.numel() * tensor.element_size())
        placed.append((name, tensor, offset))
    allocation = client.allocate(max(size, 1))
    memory = client.map(allocation, writable=True)
    try:
        written: set[int] = set()
        for _name, tensor, offset in placed:
            if offset in written or tensor.numel() == 0:
                continue
            written.add(offset)
            _view(memory, tensor.dtype, tuple(tensor.shape), offset).copy_(tensor)
    finally:
        _close_when_unused(memory)
    client.put_metadata(
        MetadataEntry(
            key=prefix + name,
            allocation_id=allocation.allocation_id,
            offset=offset,
            value=TensorSpec(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)).encode(),
        )
        for name, tensor, offset in placed
    )
    return allocation


def mapped_tensors(
    client: GmsClient, layout: Layout | None = None, *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Every tensor of the layout whose key starts with ``prefix`` (removed from the names),
    viewing the mapped memory: no copy. Entries that share a place share one tensor.

    A reader's tensors are read-only memory: writing to them crashes the process (SIGSEGV), as
    a write to shared weights should. They stay valid after the session ends."""
    layout = layout if layout is not None else client.import_layout()
    maps: dict[int, mmap.mmap] = {}
    shared: dict[tuple[int, int, str, tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for entry in layout.metadata:
        if not entry.key.startswith(prefix):
            continue
        spec = TensorSpec.decode(entry.value)
        place = (entry.allocation_id, entry.offset, spec.dtype, spec.shape)
        tensor = shared.get(place)
        if tensor is None:
            memory = maps.get(entry.allocation_id)
            if memory is None:
                memory = maps[entry.allocation_id] = client.map(layout.allocation(entry.allocation_id))
            tensor = shared[place] = _view(memory, _dtype(spec.dtype), spec.shape, entry.offset)
        out[entry.key[len(prefix) :]] = tensor
    return out


def _view(memory: mmap.mmap, dtype: torch.dtype | str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    import torch

    dt = _dtype(dtype) if isinstance(dtype, str) else dtype
    count = 1
    for d in shape:
        count *= d
    if count == 0:
        return torch.empty(shape, dtype=dt)
    end = offset + count * dt.itemsize
    if end > len(memory):
        raise ValueError(f"a {dt} tensor of shape {list(shape)} at offset {offset} ends past the allocation")
    with warnings.catch_warnings():
        # A read-only mapping is the point for readers; torch warns that it cannot enforce it.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(memory, dtype=dt, count=count, offset=offset)
    return flat.view(shape)


def _close_when_unused(memory: Any) -> None:
    """Unmap the writer's mapping now if no tensor views it any more (else when they go)."""
    with contextlib.suppress(BufferError):
        memory.close()
