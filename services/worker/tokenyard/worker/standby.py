"""Standby failover (``--standby-lock``): of the workers sharing a lock file, the one holding it
serves; the others start their engine (with ``--cpu-gms``, the weights are mapped already), then
wait without binding their port or registering. When the active worker dies, the kernel drops
its lock, a standby takes it within one poll and only then binds and registers in discovery.
Starting a new standby after a takeover is the operator's (or the supervisor's) job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# A blocking flock cannot be cancelled; polling a non-blocking one keeps SIGTERM working.
POLL_S = 0.02


class StandbyLock:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # For operators: who serves now.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return True

    async def acquire(self) -> None:
        """Return once this process holds the lock (at once when nobody does)."""
        if self.try_acquire():
            return
        log.info("standby: another worker holds %s; waiting to take over", self.path)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(POLL_S)
            if self.try_acquire():
                break
        log.info("standby: took over %s after %.1fs of standby", self.path, loop.time() - started)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
