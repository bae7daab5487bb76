"""Discovery in a directory of lease files: the embedded default for several processes on one host.

One file per instance, ``<dir>/<service>.<instance_id>.json``, holding ``{"ttl": s, "instance": {...}}``.
The file's mtime is the lease: the owner touches it every ttl/3, and readers ignore a file older than
the TTL written in it (the writer's TTL, so clients with different TTLs agree on what is alive).

Whoever can write to the folder can register a worker and receive prompts, so the folder must be
this user's alone: it is created 0700, and before first use it and the per-user folder above it
(``tokenyard-<uid>``, or any parent this client created) are checked with ``lstat``: owned by this
user, not a symlink, no access for group or others (any other parent must not let others replace
the folder: this user's or root's, writable by others only if sticky, like /tmp). A folder of ours
that others may only read is tightened to 0700; one that is not ours, or that others may write to,
is refused. Records are
written 0600. A folder shared on purpose with other users (who may then all register instances)
needs ``TOKENYARD_DISCOVERY_SHARED=1`` in the environment of every process that uses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import stat
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
# Set to 1 to use a discovery folder that other users may write to (see the module's docstring).
SHARED_ENV = "TOKENYARD_DISCOVERY_SHARED"
_PER_USER_RE = re.compile(r"^tokenyard-[0-9]+$")


def shared_allowed() -> bool:
    return os.environ.get(SHARED_ENV, "").strip().lower() in ("1", "true", "yes")


def _create_private(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents 0700; the folders this call created."""
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by another process in between: checked like any existing folder
        created.append(folder)
    return created


def _private(folder: Path, what: str) -> None:
    """Refuse ``folder`` unless it is this user's alone; tighten it if others may only read it."""
    info = os.lstat(folder)
    uid = os.getuid()
    hint = (
        f"another user could register fake instances there and receive requests; remove it or use "
        f"a folder of your own (--discovery), or set {SHARED_ENV}=1 if you share it on purpose"
    )
    if stat.S_ISLNK(info.st_mode):
        raise DiscoveryError(f"{what} is a symlink: {hint}")
    if not stat.S_ISDIR(info.st_mode):
        raise DiscoveryError(f"{what} is not a directory")
    if info.st_uid != uid:
        raise DiscoveryError(f"{what} belongs to uid {info.st_uid}, not to this user (uid {uid}): {hint}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise DiscoveryError(f"{what} is writable by group or others (mode {mode:04o}): {hint}")
    if mode & 0o077:
        # Ours, and nobody else could have written to it: tightening it is safe.
        os.chmod(folder, mode & 0o700)
        log.info("tightened %s from mode %04o to %04o", folder, mode, mode & 0o700)


def _not_replaceable(parent: Path) -> None:
    """Refuse a parent folder in which others could rename the discovery folder and put their own.

    Its owner's (or root's) alone, or sticky like /tmp (only a folder's owner may rename it there).
    """
    info = os.stat(parent)
    hint = f"use a folder in a private place, or set {SHARED_ENV}=1 if you share it on purpose"
    if info.st_uid not in (os.getuid(), 0):
        raise DiscoveryError(
            f"its parent {parent} belongs to uid {info.st_uid}, who could replace the folder; {hint}"
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(info.st_mode)
        raise DiscoveryError(
            f"its parent {parent} is writable by group or others (mode {mode:04o}): another user "
            f"could replace the folder with one of their own; {hint}"
        )


class DirectoryDiscovery(LeasedDiscovery):
    def __init__(self, path: Path, *, ttl: float, poll_interval: float = 0.25) -> None:
        super().__init__(f"dir://{path}", ttl)
        self.path = path
        self._poll = poll_interval
        self._bad: set[tuple[str, int, int]] = set()  # (name, inode, size) of files already warned about
        self._secured = False

    def _secure(self) -> None:
        """Create the folder 0700 and check who may write to it, once (see the module docstring).

        Once it and its parent are this user's alone, nobody else can swap them: no later check.
        """
        if self._secured:
            return
        try:
            created = _create_private(self.path)
            if shared_allowed():
                if not self.path.is_dir():
                    raise DiscoveryError("it is not a directory")
            else:
                _private(self.path, "it")
                parent = self.path.parent
                if parent in created or _PER_USER_RE.match(parent.name):
                    _private(parent, f"its parent {parent}")
                else:
                    _not_replaceable(parent)
        except DiscoveryError as exc:
            raise DiscoveryError(f"cannot use discovery directory {self.path}: {exc}") from None
        except OSError as exc:
            raise self._error(exc) from None
        self._secured = True

    def _file(self, service: str, instance_id: int) -> Path:
        return self.path / f"{service}.{instance_id}.json"

    def _error(self, exc: OSError) -> DiscoveryError:
        where = exc.filename or self.path
        return DiscoveryError(f"cannot use discovery directory {self.path}: {where}: {exc.strerror or exc}")

    def _write(self, instance: Instance) -> None:
        target = self._file(instance.service, instance.instance_id)
        tmp = self.path / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        body = json.dumps({"ttl": self.ttl, "instance": instance.to_dict()}, separators=(",", ":"))
        self._secure()
        try:
            # 0600 (readable by the others only in a folder shared on purpose), created anew and
            # never through a link: records say where to send prompts.
            mode = 0o644 if shared_allowed() else 0o600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(body)
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
        # Readers check too: records in a folder others can write to may send prompts anywhere.
        self._secure()
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []  # removed since it was created
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
