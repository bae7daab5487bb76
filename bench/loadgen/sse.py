"""Server-sent events, parsed incrementally from the bytes of a streaming HTTP body.

Network reads cut the stream anywhere: inside a line, between ``\\r`` and ``\\n``, or inside a
multi-byte UTF-8 character. The parser therefore keeps undecoded bytes until a whole line is
there; line terminators never occur inside a UTF-8 sequence, so decoding whole lines is safe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str | None = None


class SseParser:
    """Feed it bytes as they arrive; it returns the events those bytes completed."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        start = 0
        buf = self._buffer
        while True:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                if cr == len(buf) - 1:
                    # A lone trailing \r may be the first half of \r\n: wait for the next read.
                    break
                end, next_start = cr, cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            else:
                end, next_start = lf, lf + 1
            event = self._line(bytes(buf[start:end]).decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            start = next_start
        del buf[:start]
        return events

    def close(self) -> list[SseEvent]:
        """End of body. Lenient: an event that lacks its closing blank line is still delivered."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append(self._dispatch())
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            if self._data:
                return self._dispatch()
            self._event = None
            return None
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> SseEvent:
        event = SseEvent(data="\n".join(self._data), event=self._event)
        self._data = []
        self._event = None
        return event
