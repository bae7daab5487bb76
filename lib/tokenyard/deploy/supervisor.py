"""How ``tokenyard up`` treats a child that dies: restart it, like an init system.

A child that exits on its own is started again after a delay that doubles with each recent
restart (``initial_backoff``, 2x, 4x, ... up to ``max_backoff``), so a child that crashes at once
does not spin. A child that needed more than ``max_restarts`` restarts within ``window`` seconds is
given up on: the deployment stops and says which child, how often and with what exit status,
since a crash loop will not mend itself.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    max_restarts: int = 5
    window: float = 120.0
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    first_at_once: bool = False
    """Restart the first crash (within ``window``) without delay; the backoff starts at the second.
    For a restart that costs next to nothing (a fork of a process that has imported everything),
    where a crash that happens once should cost as little downtime as possible."""


class RestartTracker:
    """One child's recent restarts under a :class:`RestartPolicy`."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._recent: deque[float] = deque()
        self.total = 0

    @property
    def recent(self) -> int:
        self._forget_old()
        return len(self._recent)

    def next_delay(self) -> float | None:
        """Seconds to wait before restarting a child that just exited; None: give up."""
        self._forget_old()
        p = self.policy
        if len(self._recent) >= p.max_restarts:
            return None
        exponent = len(self._recent) - 1 if p.first_at_once else len(self._recent)
        delay = 0.0 if exponent < 0 else min(p.max_backoff, p.initial_backoff * float(2**exponent))
        self._recent.append(self._clock())
        self.total += 1
        return delay

    def _forget_old(self) -> None:
        horizon = self._clock() - self.policy.window
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()


def describe_exit(code: int | None) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL``."""
    if code is None:
        return "is running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
