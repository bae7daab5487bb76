"""Discovery in Redis: records are keys with a TTL, renewed by heartbeats; changes go out on pub/sub.

Keys: ``tokenyard:instances:<service>:<instance_id>`` = the instance's JSON, with a TTL of the lease.
Heartbeats renew with ``SET ... PX`` rather than ``PEXPIRE`` so that a record lost with a Redis restart
or flush is written again by its still-running owner. Notifications on :data:`CHANNEL` make watches
prompt; a full rescan every ``resync_interval`` makes them correct regardless, since pub/sub is
best-effort and expiries (a SIGKILLed owner) publish nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from tokenyard.common.discovery.base import DEFAULT_TTL, WatchEvent
from tokenyard.common.discovery.errors import DiscoveryError
from tokenyard.common.discovery.lease import LeasedDiscovery
from tokenyard.common.discovery.records import Instance
from tokenyard.common.discovery.url import redact
from tokenyard.common.discovery.view import InstanceView

log = logging.getLogger("tokenyard.common.discovery")

KEY_PREFIX = "tokenyard:instances:"
CHANNEL = "tokenyard:discovery:events"
_MGET_CHUNK = 500


def record_key(service: str, instance_id: int) -> str:
    return f"{KEY_PREFIX}{service}:{instance_id}"


class RedisDiscovery(LeasedDiscovery):
    def __init__(self, url: str, *, ttl: float, resync_interval: float = 1.0) -> None:
        super().__init__(redact(url), ttl)
        self._resync = resync_interval
        self._bad_keys: set[str] = set()
        # Short timeouts: a dead Redis must surface as an error well within one lease, and a failed
        # command is retried once or twice so that a pooled connection broken by a restart reconnects.
        timeout = min(5.0, max(0.5, ttl / 2))
        try:
            self._client: Redis = Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
            )
        except ValueError as exc:  # an option in the query string that redis-py rejects
            raise DiscoveryError(f"discovery URL {self.url!r}: {exc}") from None

    # --- errors ------------------------------------------------------------------------------------

    def _error(self, exc: BaseException) -> DiscoveryError:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return DiscoveryError(f"cannot reach {self.url}: {detail}")

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise self._error(exc) from None

    # --- records -----------------------------------------------------------------------------------

    async def _publish(self, doc: dict[str, Any]) -> None:
        await self._client.publish(CHANNEL, json.dumps(doc, separators=(",", ":")))

    async def _put(self, instance: Instance) -> None:
        with self._reachable():
            key = record_key(instance.service, instance.instance_id)
            await self._client.set(key, instance.to_json(), px=self._ttl_ms())
            await self._publish({"op": "put", "instance": instance.to_dict()})

    async def _refresh(self, instance: Instance) -> bool:
        with self._reachable():
            key = record_key(instance.service, instance.instance_id)
            previous = await self._client.set(key, instance.to_json(), px=self._ttl_ms(), get=True)
            if previous is None:
                await self._publish({"op": "put", "instance": instance.to_dict()})
                return True
            return False

    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    async def _delete(self, instance_id: int, service: str | None) -> None:
        with self._reachable():
            if service is not None:
                keys = [record_key(service, instance_id)]
            else:
                keys = [
                    k async for k in self._client.scan_iter(match=f"{KEY_PREFIX}*:{instance_id}", count=1000)
                ]
            for key in keys:
                await self._client.delete(key)
                owner = key[len(KEY_PREFIX) :].rpartition(":")[0]
                await self._publish({"op": "delete", "service": owner, "instance_id": instance_id})

    async def _live(self, service: str | None) -> list[Instance]:
        with self._reachable():
            return await self._scan(service)

    async def _scan(self, service: str | None) -> list[Instance]:
        pattern = f"{KEY_PREFIX}{service}:*" if service is not None else f"{KEY_PREFIX}*"
        keys = [k async for k in self._client.scan_iter(match=pattern, count=1000)]
        found: list[Instance] = []
        for start in range(0, len(keys), _MGET_CHUNK):
            chunk = keys[start : start + _MGET_CHUNK]
            values = await self._client.mget(chunk)
            for key, value in zip(chunk, values, strict=True):
                if value is None:
                    continue  # expired or deleted since the scan
                instance = self._parse(key, value)
                if instance is not None:
                    found.append(instance)
        return found

    def _parse(self, key: str, value: str | bytes) -> Instance | None:
        try:
            instance = Instance.from_json(value)
            if record_key(instance.service, instance.instance_id) != key:
                raise DiscoveryError("the record's service and instance_id do not match its key")
        except DiscoveryError as exc:
            if key not in self._bad_keys:
                if len(self._bad_keys) > 10_000:
                    self._bad_keys.clear()
                self._bad_keys.add(key)
                log.warning("ignoring malformed discovery record %s in %s: %s", key, self.url, exc)
            return None
        return instance

    # --- watching ----------------------------------------------------------------------------------

    async def _subscribe(self) -> PubSub:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
        except BaseException:
            await _close_quietly(pubsub)
            raise
        return pubsub

    async def _run_id(self) -> str:
        info = await self._client.info("server")
        return str(info.get("run_id", ""))

    def _on_message(self, view: InstanceView, message: Any, service: str | None) -> WatchEvent | None:
        if not isinstance(message, dict) or message.get("type") != "message":
            return None
        try:
            doc = json.loads(message["data"])
            if doc["op"] == "put":
                instance = Instance.from_dict(doc["instance"])
                if service is None or instance.service == service:
                    return view.put(instance)
            elif doc["op"] == "delete" and (service is None or doc["service"] == service):
                return view.remove(int(doc["instance_id"]))
        except (ValueError, KeyError, TypeError, DiscoveryError) as exc:
            log.warning("ignoring malformed discovery notification on %s: %s", CHANNEL, exc)
        return None

    async def watch(self, service: str | None = None) -> AsyncIterator[WatchEvent]:
        self._check_open()
        view = InstanceView()
        pubsub: PubSub | None = None
        try:
            # Subscribe before the first scan, so that no change falls between the two.
            with self._reachable():
                pubsub = await self._subscribe()
                run_id = await self._run_id()
                snapshot = await self._scan(service)
            for event in view.sync(snapshot):
                yield event
            next_resync = time.monotonic() + self._resync
            grace_until = 0.0
            backoff = 0.1
            outage = False
            while not self._closed:
                events: list[WatchEvent] = []
                try:
                    if pubsub is None:
                        pubsub = await self._subscribe()
                        next_resync = 0.0
                    now = time.monotonic()
                    if now >= next_resync:
                        current = await self._run_id()
                        if current != run_id:
                            # A restarted Redis is empty until every owner's heartbeat writes its record
                            # again (within the owner's ttl/3); reporting them all removed meanwhile would
                            # make routers drop healthy workers. Owners' leases are unknown here, so
                            # removals wait at least one default lease.
                            grace = max(self.ttl, DEFAULT_TTL)
                            grace_until = time.monotonic() + grace
                            log.warning(
                                "discovery at %s restarted; waiting up to %.1fs for instances to register again",
                                self.url,
                                grace,
                            )
                            run_id = current
                        snapshot = await self._scan(service)
                        events = view.sync(snapshot, keep_missing=time.monotonic() < grace_until)
                        next_resync = time.monotonic() + self._resync
                    else:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=next_resync - now
                        )
                        changed = self._on_message(view, message, service)
                        if changed is not None:
                            events.append(changed)
                except (RedisError, OSError) as exc:
                    if self._closed:
                        return
                    if not outage:
                        log.warning("lost discovery at %s, watch retrying: %s", self.url, self._error(exc))
                        outage = True
                    if pubsub is not None:
                        await _close_quietly(pubsub)
                        pubsub = None
                    if not await self._sleep_unless_closed(backoff):
                        return
                    backoff = min(backoff * 2, 2.0)
                    continue
                if outage:
                    log.info("discovery at %s answers again; watch resumed", self.url)
                    outage = False
                    backoff = 0.1
                for event in events:
                    yield event
        finally:
            if pubsub is not None:
                await _close_quietly(pubsub)

    async def _close_backend(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


async def _close_quietly(pubsub: PubSub) -> None:
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()
