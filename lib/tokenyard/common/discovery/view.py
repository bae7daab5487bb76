"""A watcher's view of the registry, turned into events by diffing."""

from __future__ import annotations

from collections.abc import Iterable

from tokenyard.common.discovery.base import WatchEvent, WatchEventKind
from tokenyard.common.discovery.records import Instance


class InstanceView:
    """``instance id -> Instance`` as last reported to a watcher."""

    def __init__(self) -> None:
        self.instances: dict[int, Instance] = {}

    def put(self, instance: Instance) -> WatchEvent | None:
        previous = self.instances.get(instance.instance_id)
        if previous == instance:
            return None
        self.instances[instance.instance_id] = instance
        kind = WatchEventKind.ADDED if previous is None else WatchEventKind.UPDATED
        return WatchEvent(kind, instance)

    def remove(self, instance_id: int) -> WatchEvent | None:
        previous = self.instances.pop(instance_id, None)
        return None if previous is None else WatchEvent(WatchEventKind.REMOVED, previous)

    def sync(self, snapshot: Iterable[Instance], *, keep_missing: bool = False) -> list[WatchEvent]:
        """Events that turn the view into ``snapshot``; removals are held back while ``keep_missing``."""
        live = {i.instance_id: i for i in snapshot}
        events: list[WatchEvent] = []
        if not keep_missing:
            for instance_id in [i for i in self.instances if i not in live]:
                event = self.remove(instance_id)
                if event is not None:
                    events.append(event)
        for instance in sorted(live.values(), key=lambda i: (i.service, i.instance_id)):
            event = self.put(instance)
            if event is not None:
                events.append(event)
        return events
