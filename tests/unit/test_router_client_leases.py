"""Client leases on the event loop's clock: when a release is due after a client's notification
stream broke, and what puts it off or calls it off."""

from __future__ import annotations

import asyncio

from tokenyard.router.client_leases import ClientLeases

AFTER = 0.5


def leases(released: list[str]) -> ClientLeases:
    def release(rid: str) -> bool:
        released.append(rid)
        return True

    return ClientLeases(release, lambda rid: True, release_after=AFTER)


def broken(table: ClientLeases, client: str, *rids: str) -> None:
    for rid in rids:
        table.routed(client, rid)
    table.stream_opened(client)
    table.stream_closed(client, broken=True)


async def test_a_sign_of_life_after_a_break_puts_the_release_off_and_does_not_call_it_off() -> None:
    released: list[str] = []
    table = leases(released)
    broken(table, "c", "r1")
    await asyncio.sleep(AFTER * 0.6)
    table.seen("c")  # a unary notification
    await asyncio.sleep(AFTER * 0.6)
    assert released == [], "silent for release_after since the notification only"
    table.routed("c", "r2")  # a Route, then the client dies
    await asyncio.sleep(AFTER * 0.6)
    assert released == []
    await asyncio.sleep(AFTER * 0.8)
    assert sorted(released) == ["r1", "r2"] and table.released == 2
    assert table.pending("c") == 0


async def test_a_new_stream_calls_the_release_off_until_it_breaks_in_turn() -> None:
    released: list[str] = []
    table = leases(released)
    broken(table, "c", "r1")
    table.stream_opened("c")
    await asyncio.sleep(AFTER * 2)
    assert released == [] and table.pending("c") == 1
    table.stream_closed("c", broken=True)
    await asyncio.sleep(AFTER * 2)
    assert released == ["r1"]


async def test_a_client_whose_requests_all_finished_is_forgotten() -> None:
    released: list[str] = []
    table = leases(released)
    broken(table, "c", "r1")
    table.finished("r1")
    assert table._clients == {}
    await asyncio.sleep(AFTER * 2)
    assert released == [] and table.released == 0


async def test_a_stream_this_router_ended_releases_nothing() -> None:
    released: list[str] = []
    table = leases(released)
    table.routed("c", "r1")
    table.stream_opened("c")
    table.stream_closed("c", broken=False)
    await asyncio.sleep(AFTER * 2)
    assert released == [] and table.pending("c") == 1
