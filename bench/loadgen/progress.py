"""A live progress line on stderr, redrawn in place; stdlib only."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from types import TracebackType
from typing import Literal, TextIO

from bench.loadgen.client import RequestRecord

ProgressMode = Literal["auto", "on", "off"]


class Progress:
    """Counts requests as they are sent and finish, and redraws one status line.

    On a terminal the line is redrawn in place; elsewhere (a log file, CI) ``on`` prints a new
    line every few seconds and ``auto`` prints nothing.
    """

    def __init__(
        self,
        label: str,
        *,
        total: int | None,
        duration_s: float | None,
        mode: ProgressMode = "auto",
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.duration_s = duration_s
        self.stream = stream if stream is not None else sys.stderr
        tty = self.stream.isatty()
        self.in_place = tty and mode != "off"
        self.enabled = mode == "on" or self.in_place
        self.interval_s = 0.25 if self.in_place else 5.0
        self.sent = 0
        self.done = 0
        self.failed = 0
        self._ttft_sum = 0.0
        self._ttft_n = 0
        self._started = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def request_sent(self) -> None:
        self.sent += 1

    def request_done(self, record: RequestRecord) -> None:
        self.done += 1
        if not record.ok:
            self.failed += 1
        elif record.ttft_s is not None:
            self._ttft_sum += record.ttft_s
            self._ttft_n += 1

    def line(self) -> str:
        elapsed = time.perf_counter() - self._started
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        clock = f"{elapsed:.1f}s" + (f"/{self.duration_s:.0f}s" if self.duration_s is not None else "")
        ttft = f"{self._ttft_sum / self._ttft_n * 1000:.0f}ms" if self._ttft_n else "-"
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"[{self.label}] {count} done, {self.sent - self.done} in flight, {self.failed} failed, "
            f"{rate:.1f} req/s, mean TTFT {ttft}, {clock}"
        )

    def _draw(self, final: bool = False) -> None:
        if self.in_place:
            self.stream.write("\r" + self.line() + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._draw()

    async def __aenter__(self) -> Progress:
        self._started = time.perf_counter()
        if self.enabled:
            self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self._draw(final=True)
