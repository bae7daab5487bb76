"""The waiting queue both engines' schedulers share: priority classes, FIFO within a class."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    """Priority classes, highest first, each first in first out; preempted requests jump their class."""

    def __init__(self, priority: Callable[[T], int]) -> None:
        self._priority = priority
        self._classes: dict[int, deque[T]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        for priority in sorted(self._classes, reverse=True):
            yield from self._classes[priority]

    def push_back(self, item: T) -> None:
        self._classes.setdefault(self._priority(item), deque()).append(item)
        self._len += 1

    def push_front(self, item: T) -> None:
        self._classes.setdefault(self._priority(item), deque()).appendleft(item)
        self._len += 1

    def peek(self) -> T | None:
        if not self._classes:
            return None
        return self._classes[max(self._classes)][0]

    def remove(self, item: T) -> None:
        priority = self._priority(item)
        queue = self._classes[priority]
        queue.remove(item)
        self._len -= 1
        if not queue:
            del self._classes[priority]
