"""The gms's own Prometheus metrics (``tokenyard_gms_*``), next to the RPC metrics every service has."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from tokenyard.common.gms.types import LockEvent, LockMode, LockState, MemoryTag
from tokenyard.common.metrics import Metrics
from tokenyard.gms.lock import LockDomain


class GmsMetrics:
    def __init__(self, metrics: Metrics, tags: tuple[MemoryTag, ...]) -> None:
        registry = metrics.registry
        self.allocated_bytes = Gauge(
            "tokenyard_gms_allocated_bytes",
            "Bytes allocated (aligned), committed and being built, by tag.",
            ["tag"],
            registry=registry,
        )
        self.allocations = Gauge(
            "tokenyard_gms_allocations",
            "Allocations, committed and being built, by tag.",
            ["tag"],
            registry=registry,
        )
        self.state = Gauge(
            "tokenyard_gms_lock_state",
            "1 for the lock state each tag is in, 0 for the others.",
            ["tag", "state"],
            registry=registry,
        )
        self.clients = Gauge(
            "tokenyard_gms_clients",
            "Sessions holding the lock, by tag and mode (rw, ro).",
            ["tag", "mode"],
            registry=registry,
        )
        self.waiting = Gauge(
            "tokenyard_gms_lock_waiting",
            "Lock calls waiting for a state that allows them, by tag.",
            ["tag"],
            registry=registry,
        )
        self.transitions = Counter(
            "tokenyard_gms_lock_transitions_total",
            "Lock transitions by tag and event (rw_connect, rw_commit, rw_abort, ro_connect, ro_disconnect).",
            ["tag", "event"],
            registry=registry,
        )
        self.allocation_retries = Counter(
            "tokenyard_gms_allocation_retries_total",
            "Allocation attempts that found no memory and were retried, by tag.",
            ["tag"],
            registry=registry,
        )
        self.allocation_failures = Counter(
            "tokenyard_gms_allocation_failures_total",
            "Allocations refused (RESOURCE_EXHAUSTED) after the retry timeout, by tag.",
            ["tag"],
            registry=registry,
        )
        self.descriptors = Counter(
            "tokenyard_gms_descriptors_sent_total",
            "Descriptors passed over the descriptor socket, by tag and mode (rw, ro).",
            ["tag", "mode"],
            registry=registry,
        )
        self.descriptor_errors = Counter(
            "tokenyard_gms_descriptor_errors_total",
            "Descriptor requests refused, by gRPC status name (invalid_argument: a bad frame).",
            ["code"],
            registry=registry,
        )
        for tag in tags:
            for event in LockEvent:
                self.transitions.labels(tag.value, event.value)
            self.allocation_retries.labels(tag.value)
            self.allocation_failures.labels(tag.value)

    def observe(self, domain: LockDomain, event: LockEvent | None) -> None:
        tag = domain.tag.value
        if event is not None:
            self.transitions.labels(tag, event.value).inc()
        self.allocated_bytes.labels(tag).set(domain.allocated_bytes)
        self.allocations.labels(tag).set(domain.allocation_count)
        for state in LockState:
            self.state.labels(tag, state.value).set(1 if domain.state is state else 0)
        self.clients.labels(tag, LockMode.RW.value).set(1 if domain.writer is not None else 0)
        self.clients.labels(tag, LockMode.RO.value).set(len(domain.readers))
        self.waiting.labels(tag).set(domain.waiting)
