"""Discovery in a directory of lease files: the embedded default for several processes on one host.

One file per instance, ``<dir>/<service>.<instance_id>.json``, holding ``{"ttl": s, "instance": {...}}``.
The file's mtime is the lease: the owner touches it every ttl/3, and readers ignore a file older than
the TTL written in it (the writer's TTL, so clients with different TTLs agree on what is alive).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tokenyard.common.discovery.base import WatchEvent
from tokenyard.common.discovery.errors import DiscoveryError
from tokenyard.common.discovery.lease import LeasedDiscovery
from tokenyard.common.discovery.records import Instance
from tokenyard.common.discovery.view import InstanceView

log = logging.getLogger("tokenyard.common.discovery")

_RECORD_RE = re.compile(r"^([a-z][a-z0-9_-]*)\.([0-9]+)\.json$")
# A writer killed between write and rename leaves its temporary file behind; it is swept after this.
_STALE_TMP_S = 60.0


class DirectoryDiscovery(LeasedDiscovery):
    def __init__(self, path: Path, *, ttl: float, poll_interval: float = 0.25) -> None:
        super().__init__(f"dir://{path}", ttl)
        self.path = path
        self._poll = poll_interval
        self._bad: set[tuple[str, int, int]] = set()  # (name, inode, size) of files already warned about

    def _file(self, service: str, instance_id: int) -> Path:
        return self.path / f"{service}.{instance_id}.json"

    def _error(self, exc: OSError) -> DiscoveryError:
        where = exc.filename or self.path
        return DiscoveryError(f"cannot use discovery directory {self.path}: {where}: {exc.strerror or exc}")

    def _write(self, instance: Instance) -> None:
        target = self._file(instance.service, instance.instance_id)
        tmp = self.path / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        body = json.dumps({"ttl": self.ttl, "instance": instance.to_dict()}, separators=(",", ":"))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body, encoding="utf-8")
            # rename is atomic: readers see the old record or the new one, never a torn write.
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._error(exc) from None

    async def _put(self, instance: Instance) -> None:
        self._write(instance)

    async def _refresh(self, instance: Instance) -> bool:
        try:
            os.utime(self._file(instance.service, instance.instance_id))
            return False
        except FileNotFoundError:
            # Deleted by hand, or swept by a reader after this process stalled past its lease.
            self._write(instance)
            return True
        except OSError as exc:
            raise self._error(exc) from None

    async def _delete(self, instance_id: int, service: str | None) -> None:
        try:
            if service is not None:
                targets = [self._file(service, instance_id)]
            else:
                targets = list(self.path.glob(f"*.{instance_id}.json"))
            for target in targets:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(exc) from None

    async def _live(self, service: str | None) -> list[Instance]:
        return self._scan(service)

    def _scan(self, service: str | None) -> list[Instance]:
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []  # nobody has registered yet
        except OSError as exc:
            raise self._error(exc) from None
        now = time.time()
        found: list[Instance] = []
        for entry in entries:
            match = _RECORD_RE.match(entry.name)
            if match is None:
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    self._sweep(entry, now, _STALE_TMP_S)
                continue
            if service is not None and match.group(1) != service:
                continue
            instance = self._read(entry, now)
            if instance is not None:
                found.append(instance)
        return found

    def _read(self, entry: os.DirEntry[str], now: float) -> Instance | None:
        try:
            stat = entry.stat()
            body = Path(entry.path).read_bytes()
        except FileNotFoundError:
            return None  # deregistered between listing and reading
        except OSError as exc:
            raise self._error(exc) from None
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict) or set(doc) != {"ttl", "instance"}:
                raise DiscoveryError("expected an object with exactly the fields ttl and instance")
            ttl = doc["ttl"]
            if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl > 0:
                raise DiscoveryError(f"ttl must be a positive number, got {ttl!r}")
            instance = Instance.from_dict(doc["instance"])
            if f"{instance.service}.{instance.instance_id}.json" != entry.name:
                raise DiscoveryError("the record's service and instance_id do not match the file name")
        except (ValueError, DiscoveryError) as exc:
            key = (entry.name, stat.st_ino, stat.st_size)
            if key not in self._bad:
                if len(self._bad) > 10_000:
                    self._bad.clear()
                self._bad.add(key)
                log.warning("ignoring malformed discovery record %s: %s", entry.path, exc)
            return None
        age = now - stat.st_mtime
        if age > ttl:
            # Swept only well past its lease, so that a slow owner about to renew is rarely raced.
            self._sweep(entry, now, 2 * ttl)
            return None
        return instance

    @staticmethod
    def _sweep(entry: os.DirEntry[str], now: float, older_than: float) -> None:
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > older_than:
                os.unlink(entry.path)

    async def _close_backend(self) -> None:
        pass  # nothing is held open between calls

    async def watch(self, service: str | None = None) -> AsyncIterator[WatchEvent]:
        self._check_open()
        view = InstanceView()
        # The first scan's failure is the caller's to handle; later ones keep the last view and retry.
        for event in view.sync(self._scan(service)):
            yield event
        failing = False
        while await self._sleep_unless_closed(self._poll):
            try:
                snapshot = self._scan(service)
            except DiscoveryError as exc:
                if not failing:
                    log.warning("discovery watch of %s failing, retrying: %s", self.path, exc)
                failing = True
                continue
            failing = False
            for event in view.sync(snapshot):
                yield event
