"""Discovery records, URLs and the in-memory backend."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tokenyard.common.discovery import (
    Discovery,
    DiscoveryError,
    Instance,
    InvalidRecordError,
    ModelCard,
    WatchEvent,
    WatchEventKind,
    default_discovery_dir,
    new_instance_id,
    open_discovery,
    parse_discovery_url,
)
from tokenyard.common.discovery.directory import DirectoryDiscovery
from tokenyard.common.discovery.memory import MemoryDiscovery
from tokenyard.common.discovery.redis_backend import RedisDiscovery

pytestmark = pytest.mark.unit

CARD = ModelCard(
    model="smollm2-135m",
    tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct",
    block_size=16,
    context_length=2048,
    total_kv_blocks=512,
    engine="mocker",
    role="decode",
)


def worker(**changes: Any) -> Instance:
    fields: dict[str, Any] = {
        "instance_id": new_instance_id(),
        "service": "worker",
        "role": "decode",
        "address": "127.0.0.1:8300",
        "metrics_address": "127.0.0.1:9300",
        "model_card": CARD,
        "metadata": {"dp_rank": "0"},
    }
    fields.update(changes)
    return Instance(**fields)


def good_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(worker(instance_id=42).to_json())
    return doc


# --- records -------------------------------------------------------------------------------------


def test_instance_round_trips_through_json() -> None:
    inst = worker()
    again = Instance.from_json(inst.to_json())
    assert again == inst
    assert hash(again) == hash(inst)
    assert again.model_card == CARD
    assert dict(again.metadata) == {"dp_rank": "0"}


def test_minimal_instance_round_trips_and_optional_fields_may_be_omitted() -> None:
    inst = Instance(instance_id=7, service="router", role="", address="unix:///run/router.sock")
    assert Instance.from_json(inst.to_json()) == inst
    bare = Instance.from_json(
        '{"instance_id": 7, "service": "router", "role": "", "address": "unix:///run/router.sock"}'
    )
    assert bare == inst
    assert bare.model_card is None and dict(bare.metadata) == {} and bare.metrics_address == ""


def test_json_form_is_plain_and_complete() -> None:
    doc = good_doc()
    assert doc == {
        "instance_id": 42,
        "service": "worker",
        "role": "decode",
        "address": "127.0.0.1:8300",
        "metrics_address": "127.0.0.1:9300",
        "model_card": {
            "model": "smollm2-135m",
            "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "block_size": 16,
            "context_length": 2048,
            "total_kv_blocks": 512,
            "engine": "mocker",
            "role": "decode",
            "reasoning_parser": "",
            "tool_call_parser": "",
            "structured_output": [],
        },
        "metadata": {"dp_rank": "0"},
    }


def test_instances_are_immutable_and_hashable() -> None:
    source = {"zone": "a"}
    inst = worker(metadata=source)
    source["zone"] = "b"  # the record keeps its own copy
    assert inst.metadata["zone"] == "a"
    with pytest.raises(TypeError):
        inst.metadata["zone"] = "c"  # type: ignore[index]
    with pytest.raises(AttributeError):
        inst.address = "elsewhere:1"  # type: ignore[misc]
    assert len({inst, Instance.from_json(inst.to_json())}) == 1
    assert worker(instance_id=inst.instance_id, metadata={"zone": "b"}) != inst


def test_new_instance_ids_are_nonzero_u64_and_distinct() -> None:
    ids = [new_instance_id() for _ in range(1000)]
    assert all(0 < i < 2**64 for i in ids)
    assert len(set(ids)) == len(ids)


def _mutate(path: str, value: Any) -> dict[str, Any]:
    doc = good_doc()
    target = doc
    *parents, last = path.split(".")
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("instance_id", _DELETE, "missing field(s) instance_id"),
        ("address", _DELETE, "missing field(s) address"),
        ("instance_id", "42", "instance_id must be an integer"),
        ("instance_id", 42.0, "instance_id must be an integer"),
        ("instance_id", True, "instance_id must be an integer"),
        ("instance_id", 0, "instance_id must be in [1,"),
        ("instance_id", 2**64, "instance_id must be in [1,"),
        ("service", "Worker", "service must match"),
        ("service", "work:er", "service must match"),
        ("service", "work.er", "service must match"),
        ("service", "", "service must match"),
        ("service", None, "service must be a string"),
        ("role", "de code", "role must match"),
        ("address", "", "address must be a non-empty"),
        ("address", "127.0.0.1: 80", "address must be a non-empty"),
        ("metrics_address", 9300, "metrics_address must be a string"),
        ("metadata", ["a"], "metadata must be an object"),
        ("metadata", {"a": 1}, "metadata must map strings to strings"),
        ("model_card", "card", "model card: must be an object"),
        ("model_card.role", "both", "role must be one of aggregated, prefill, decode"),
        ("model_card.block_size", 0, "block_size must be >= 1"),
        ("model_card.context_length", -1, "context_length must be >= 1"),
        ("model_card.total_kv_blocks", 1.5, "total_kv_blocks must be an integer"),
        ("model_card.model", "", "model must not be empty"),
        ("model_card.engine", _DELETE, "missing field(s) engine"),
    ],
)
def test_malformed_records_are_rejected_with_the_field_named(path: str, value: Any, message: str) -> None:
    text = json.dumps(_mutate(path, value))
    with pytest.raises(DiscoveryError) as caught:
        Instance.from_json(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"worker"', b"\xff\xfe"])
def test_non_object_json_is_rejected(text: str | bytes) -> None:
    with pytest.raises(DiscoveryError, match="invalid instance record"):
        Instance.from_json(text)


def test_constructors_validate_like_the_parser() -> None:
    with pytest.raises(InvalidRecordError, match="service must match"):
        worker(service="no such service")
    with pytest.raises(ValueError, match="role must be one of"):
        ModelCard("m", "t", 16, 128, 10, "mocker", "both")


def test_model_card_zero_kv_blocks_is_allowed() -> None:
    card = ModelCard("m", "", 16, 128, 0, "mocker", "prefill")
    assert ModelCard.from_dict(card.to_dict()) == card


# --- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("redis://127.0.0.1:6379/0", "redis", "redis://127.0.0.1:6379/0"),
        ("redis://redis", "redis", "redis://redis"),
        ("rediss://user:secret@cache.example:6380/2", "redis", "rediss://user:secret@cache.example:6380/2"),
        ("dir:///tmp/tokenyard/discovery", "directory", "/tmp/tokenyard/discovery"),
        ("dir://localhost/var/lib/ty/", "directory", "/var/lib/ty"),
        ("file:///srv/discovery%20dir", "directory", "/srv/discovery dir"),
        ("/abs/path", "directory", "/abs/path"),
        ("memory://", "memory", ""),
        ("memory://unit-a", "memory", "unit-a"),
    ],
)
def test_urls_select_backends(url: str, kind: str, target: str) -> None:
    parsed = parse_discovery_url(url)
    assert (parsed.kind, parsed.target) == (kind, target)


def test_a_relative_plain_path_is_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_discovery_url("state/discovery").target == str(tmp_path / "state" / "discovery")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty discovery URL"),
        ("  redis://x ", "surrounding spaces"),
        ("etcd://127.0.0.1:2379", "unsupported discovery URL scheme 'etcd'"),
        ("redis://", "names no host"),
        ("redis://:6379/0", "names no host"),
        ("redis://127.0.0.1:port/0", "invalid port"),
        ("redis://127.0.0.1:99999/0", "invalid port"),
        ("redis://127.0.0.1:6379/zero", "database 'zero' is not a number"),
        ("redis:127.0.0.1", "names no host"),
        ("dir://relative/path", "names host 'relative'"),
        ("dir:relative", "absolute directory path"),
        ("dir://", "absolute directory path"),
        ("file:///", "absolute directory path"),
        ("dir:///tmp/x?mode=1", "must not have a query"),
        ("memory://a/b", "use memory:// or memory://name"),
    ],
)
def test_bad_urls_are_rejected_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(DiscoveryError) as caught:
        open_discovery(url)
    assert message in str(caught.value)


def test_passwords_do_not_leak_into_errors() -> None:
    with pytest.raises(DiscoveryError) as caught:
        open_discovery("redis://user:hunter2@127.0.0.1:6379/db")
    assert "hunter2" not in str(caught.value)
    assert "user:***@127.0.0.1:6379" in str(caught.value)


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan")])
def test_ttl_must_be_positive(ttl: float) -> None:
    with pytest.raises(DiscoveryError, match="TTL"):
        open_discovery("memory://", ttl=ttl)


def test_open_discovery_picks_the_backend_without_io() -> None:
    # Nothing listens on port 1: opening must not connect.
    assert isinstance(open_discovery("redis://127.0.0.1:1/0"), RedisDiscovery)
    assert isinstance(open_discovery("dir:///nonexistent/discovery"), DirectoryDiscovery)
    assert isinstance(open_discovery("memory://x"), MemoryDiscovery)


def test_default_discovery_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENYARD_HOME", str(tmp_path / "home"))
    assert default_discovery_dir() == tmp_path / "home" / "discovery"
    monkeypatch.delenv("TOKENYARD_HOME")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_discovery_dir() == tmp_path / "tokenyard" / "discovery"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    fallback = default_discovery_dir()
    assert fallback.name == "discovery" and fallback.parent.name == f"tokenyard-{os.getuid()}"
    assert parse_discovery_url(f"dir://{fallback}").target == str(fallback)


# --- the in-memory backend -----------------------------------------------------------------------


@pytest.fixture
def store() -> str:
    """A memory:// URL no other test shares."""
    return f"memory://{uuid.uuid4().hex}"


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


async def next_event(events: Any, within: float = 5.0) -> WatchEvent:
    event: WatchEvent = await asyncio.wait_for(anext(events), within)
    return event


async def test_clients_of_one_store_see_each_other_and_other_stores_do_not(store: str) -> None:
    a, b, other = open_discovery(store, ttl=1), open_discovery(store, ttl=1), open_discovery(store + "-x")
    w, r = worker(), worker(service="router", role="", model_card=None)
    await a.register(w)
    await b.register(r)
    assert (
        await a.instances() == await b.instances() == sorted([w, r], key=lambda i: (i.service, i.instance_id))
    )
    assert await a.instances("worker") == [w]
    assert await b.instances("router") == [r]
    assert await a.instances("planner") == []
    assert await other.instances() == []
    for d in (a, b, other):
        await d.close()


async def test_deregister_removes_at_once_and_close_removes_the_rest(store: str) -> None:
    owner, reader = open_discovery(store, ttl=1), open_discovery(store, ttl=1)
    first, second, third = worker(), worker(), worker()
    for inst in (first, second, third):
        await owner.register(inst)
    await owner.deregister(first.instance_id)
    assert {i.instance_id for i in await reader.instances()} == {second.instance_id, third.instance_id}
    await owner.close()
    assert await reader.instances() == []
    with pytest.raises(DiscoveryError, match="closed"):
        await owner.register(worker())
    await owner.close()  # idempotent
    await reader.close()


async def test_heartbeats_keep_a_record_past_its_ttl_and_a_dead_owner_expires(store: str) -> None:
    owner, reader = open_discovery(store, ttl=0.3), open_discovery(store, ttl=0.3)
    assert isinstance(owner, MemoryDiscovery)
    inst = worker()
    await owner.register(inst)
    await asyncio.sleep(1.0)  # over three leases: only the heartbeat can have kept it
    assert await reader.instances() == [inst]
    owner.abandon()

    async def gone() -> bool:
        return await reader.instances() == []

    await eventually(gone, "the abandoned record expires")
    await owner.close()
    await reader.close()


async def test_watch_reports_current_instances_then_changes(store: str) -> None:
    owner, watcher = open_discovery(store, ttl=0.3), open_discovery(store, ttl=0.3)
    assert isinstance(owner, MemoryDiscovery)
    existing = worker()
    await owner.register(existing)
    await owner.register(worker(service="router", model_card=None, role=""))
    events = watcher.watch("worker")
    assert await next_event(events) == WatchEvent(WatchEventKind.ADDED, existing)

    joined = worker()
    await owner.register(joined)
    assert await next_event(events) == WatchEvent(WatchEventKind.ADDED, joined)

    changed = worker(instance_id=joined.instance_id, metadata={"dp_rank": "1"})
    await owner.register(changed)
    assert await next_event(events) == WatchEvent(WatchEventKind.UPDATED, changed)

    await owner.deregister(existing.instance_id)
    assert await next_event(events) == WatchEvent(WatchEventKind.REMOVED, existing)

    owner.abandon()  # the owner "dies": its lease runs out
    assert await next_event(events) == WatchEvent(WatchEventKind.REMOVED, changed)

    await watcher.close()
    with pytest.raises(StopAsyncIteration):
        await next_event(events)
    await owner.close()


async def test_reregistering_replaces_the_previous_lease(store: str) -> None:
    d: Discovery = open_discovery(store, ttl=0.3)
    inst = worker()
    await d.register(inst)
    moved = worker(instance_id=inst.instance_id, address="127.0.0.1:8301")
    await d.register(moved)
    await asyncio.sleep(0.7)
    assert await d.instances() == [moved]
    await d.close()
    reader = open_discovery(store)
    assert await reader.instances() == []
    await reader.close()


def test_redis_options_in_the_query_string_are_checked_at_open() -> None:
    with pytest.raises(DiscoveryError, match="socket_timeout"):
        open_discovery("redis://127.0.0.1:6379/0?socket_timeout=soon")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    doc = _mutate("model_card.colour", "red")
    doc["added_in_a_newer_release"] = {"x": 1}
    instance = Instance.from_json(json.dumps(doc))
    assert instance.model_card is not None and not hasattr(instance.model_card, "colour")


def test_card_of_an_older_worker_takes_the_defaults_of_the_optional_fields() -> None:
    doc = CARD.to_dict()
    for key in ("reasoning_parser", "tool_call_parser", "structured_output"):
        del doc[key]
    assert ModelCard.from_dict(doc) == CARD
    for wrong in ("yes", ["json_object", 1], [""], {"json_object": True}):
        with pytest.raises(InvalidRecordError, match="structured_output"):
            ModelCard.from_dict({**CARD.to_dict(), "structured_output": wrong})


def test_structured_output_lists_kinds_and_reads_the_boolean_of_older_workers() -> None:
    card = ModelCard.from_dict({**CARD.to_dict(), "structured_output": ["json_object"]})
    assert card.structured_output == ("json_object",)
    assert card.to_dict()["structured_output"] == ["json_object"]
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    # Before the list, a boolean said whether the engine could constrain its output at all.
    assert ModelCard.from_dict({**CARD.to_dict(), "structured_output": True}).structured_output == (
        "json_object",
        "json_schema",
    )
    assert ModelCard.from_dict({**CARD.to_dict(), "structured_output": False}).structured_output == ()
