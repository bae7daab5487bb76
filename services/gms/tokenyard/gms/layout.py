"""A layout: the allocations of one tag and the metadata that names places in them.

A writer builds one (allocate, put metadata); commit validates it and fixes its hash; readers
import it. The hash covers the structure (slots, sizes, tags, metadata keys, offsets, values),
not the bytes in the memory, so content may change in place without invalidating readers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import xxhash

from tokenyard.common.errors import AlreadyExists, InvalidArgument, NotFound
from tokenyard.common.gms.types import Allocation, Layout, MemoryTag, MetadataEntry
from tokenyard.gms.backend import Handle, MemoryBackend

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 64 * 1024
MAX_METADATA_ENTRIES = 1_000_000
MAX_ALLOCATIONS = 65_536
_HASH_SEED = 0x676D73  # "gms"


@dataclass(eq=False)
class LayoutBuilder:
    """The allocations (with their backend handles) and metadata of one tag's layout."""

    tag: MemoryTag
    allocations: dict[int, tuple[Allocation, Handle]] = field(default_factory=dict)
    metadata: dict[str, MetadataEntry] = field(default_factory=dict)
    layout_hash: int | None = None
    """Set by :meth:`seal` (commit); None while being built."""

    @property
    def allocated_bytes(self) -> int:
        return sum(a.aligned_size for a, _ in self.allocations.values())

    def next_slot(self) -> int:
        return max((a.layout_slot for a, _ in self.allocations.values()), default=-1) + 1

    def check_slot(self, slot: int) -> None:
        if len(self.allocations) >= MAX_ALLOCATIONS:
            raise InvalidArgument(f"a layout holds at most {MAX_ALLOCATIONS} allocations")
        for a, _ in self.allocations.values():
            if a.layout_slot == slot:
                raise AlreadyExists(f"layout slot {slot} holds allocation {a.allocation_id} already")

    def add(self, allocation: Allocation, handle: Handle) -> None:
        self.check_slot(allocation.layout_slot)
        self.allocations[allocation.allocation_id] = (allocation, handle)

    def handle(self, allocation_id: int) -> tuple[Allocation, Handle]:
        found = self.allocations.get(allocation_id)
        if found is None:
            raise NotFound(f"no allocation {allocation_id} in this {self.tag} layout")
        return found

    def put(self, entries: list[MetadataEntry]) -> None:
        """Validate every entry first, so that a bad one leaves the table unchanged."""
        added = sum(1 for e in entries if e.key not in self.metadata)
        if len(self.metadata) + added > MAX_METADATA_ENTRIES:
            raise InvalidArgument(f"a layout holds at most {MAX_METADATA_ENTRIES} metadata entries")
        for e in entries:
            self.check_entry(e)
        for e in entries:
            self.metadata[e.key] = e

    def check_entry(self, e: MetadataEntry) -> None:
        if not e.key:
            raise InvalidArgument("a metadata key must not be empty")
        if len(e.key.encode()) > MAX_KEY_BYTES:
            raise InvalidArgument(f"metadata key {e.key[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")
        if len(e.value) > MAX_VALUE_BYTES:
            raise InvalidArgument(f"metadata {e.key!r}: value longer than {MAX_VALUE_BYTES} bytes")
        found = self.allocations.get(e.allocation_id)
        if found is None:
            raise NotFound(
                f"metadata {e.key!r} refers to allocation {e.allocation_id}, which is not in the layout"
            )
        if e.offset >= found[0].aligned_size:
            raise InvalidArgument(
                f"metadata {e.key!r}: offset {e.offset} is past the end of allocation {e.allocation_id} "
                f"({found[0].aligned_size} bytes)"
            )

    def delete(self, keys: list[str]) -> int:
        return sum(1 for k in keys if self.metadata.pop(k, None) is not None)

    def seal(self) -> int:
        """Validate the metadata against the allocations and fix the layout hash."""
        for e in self.metadata.values():
            self.check_entry(e)
        self.layout_hash = layout_hash(
            [a for a, _ in self.allocations.values()], list(self.metadata.values())
        )
        return self.layout_hash

    def view(self) -> Layout:
        return Layout(
            layout_hash=self.layout_hash if self.layout_hash is not None else 0,
            allocations=tuple(sorted((a for a, _ in self.allocations.values()), key=lambda a: a.layout_slot)),
            metadata=tuple(sorted(self.metadata.values(), key=lambda e: e.key)),
        )

    def release(self, backend: MemoryBackend) -> None:
        """Give every allocation back (clients that mapped them keep their mappings)."""
        for _, handle in self.allocations.values():
            backend.release(handle)
        self.allocations.clear()
        self.metadata.clear()


def layout_hash(allocations: list[Allocation], metadata: list[MetadataEntry]) -> int:
    """XXH3-64 of the structure: allocations by slot (slot, size, aligned size, tag) and metadata
    by key (key, the allocation's slot, offset, value). Allocation ids are left out: they differ
    between two builds of the same layout."""
    h = xxhash.xxh3_64(seed=_HASH_SEED)
    slot_of = {a.allocation_id: a.layout_slot for a in allocations}
    for a in sorted(allocations, key=lambda a: a.layout_slot):
        tag = a.tag.value.encode()
        h.update(struct.pack("<IQQH", a.layout_slot, a.size, a.aligned_size, len(tag)) + tag)
    for e in sorted(metadata, key=lambda e: e.key):
        key = e.key.encode()
        h.update(struct.pack("<IIQI", len(key), slot_of[e.allocation_id], e.offset, len(e.value)))
        h.update(key + e.value)
    return h.intdigest()
