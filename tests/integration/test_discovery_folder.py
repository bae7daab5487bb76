"""The discovery folder is this user's alone: created 0700 with 0600 records, and a folder others
could write to (so could fill with fake workers that receive prompts) is refused, readers included,
with a one-line reason and the way to share a folder on purpose."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tokenyard.common.discovery import DiscoveryError, Instance, open_discovery

pytestmark = pytest.mark.integration

TTL = 5.0
SHARED = "TOKENYARD_DISCOVERY_SHARED"


@pytest.fixture(autouse=True)
def _not_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED, raising=False)


def _worker(instance_id: int = 7, address: str = "127.0.0.1:26001") -> Instance:
    # A router's record: no model card needed; the folder does not care which service registers.
    return Instance(service="router", instance_id=instance_id, role="", address=address)


def _plant(folder: Path) -> None:
    """A fake worker's record, as another user would leave it."""
    record = {"ttl": 3600, "instance": _worker(666, "127.0.0.1:26666").to_dict()}
    (folder / "router.666.json").write_text(json.dumps(record))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_a_new_folder_and_its_records_are_private(tmp_path: Path) -> None:
    folder = tmp_path / "fresh" / f"tokenyard-{os.getuid()}" / "discovery"
    discovery = open_discovery(f"dir://{folder}", ttl=TTL)
    try:
        await discovery.register(_worker())
        assert await discovery.instances() == [_worker()]
    finally:
        await discovery.close()
    for created in (folder, folder.parent, folder.parent.parent):
        assert _mode(created) == 0o700, created
    second = open_discovery(f"dir://{folder}", ttl=TTL)
    try:
        await second.register(_worker(8))
        assert _mode(folder / "router.8.json") == 0o600
    finally:
        await second.close()


async def test_a_folder_others_can_write_to_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "discovery"
    folder.mkdir()
    folder.chmod(0o777)
    _plant(folder)
    discovery = open_discovery(f"dir://{folder}", ttl=TTL)
    try:
        # A reader too: the planted record must never be followed.
        with pytest.raises(DiscoveryError) as refused:
            await discovery.instances()
        message = str(refused.value)
        assert "\n" not in message
        assert f"cannot use discovery directory {folder}" in message
        assert "writable by group or others (mode 0777)" in message
        assert f"{SHARED}=1" in message
        with pytest.raises(DiscoveryError, match="writable by group or others"):
            await discovery.register(_worker())
    finally:
        await discovery.close()
    assert _mode(folder) == 0o777  # refused, not silently changed


async def test_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    _plant(real)
    link = tmp_path / "discovery"
    link.symlink_to(real)
    discovery = open_discovery(f"dir://{link}", ttl=TTL)
    try:
        with pytest.raises(DiscoveryError, match="is a symlink"):
            await discovery.instances()
    finally:
        await discovery.close()


async def test_a_per_user_parent_others_can_write_to_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / f"tokenyard-{os.getuid()}"
    parent.mkdir()
    parent.chmod(0o777)
    discovery = open_discovery(f"dir://{parent / 'discovery'}", ttl=TTL)
    try:
        with pytest.raises(DiscoveryError, match=f"its parent {parent} is writable by group or others"):
            await discovery.register(_worker())
    finally:
        await discovery.close()


async def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    folder = tmp_path / "discovery"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    discovery = open_discovery(f"dir://{folder}", ttl=TTL)
    try:
        with pytest.raises(DiscoveryError, match="belongs to uid 65534, not to this user"):
            await discovery.instances()
    finally:
        await discovery.close()


async def test_a_folder_of_ours_others_may_only_read_is_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "discovery"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    discovery = open_discovery(f"dir://{folder}", ttl=TTL)
    try:
        await discovery.register(_worker())
        assert await discovery.instances() == [_worker()]
    finally:
        await discovery.close()
    assert _mode(folder) == 0o700


async def test_a_folder_shared_on_purpose_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "discovery"
    folder.mkdir()
    folder.chmod(0o777)
    monkeypatch.setenv(SHARED, "1")
    discovery = open_discovery(f"dir://{folder}", ttl=TTL)
    try:
        await discovery.register(_worker())
        assert await discovery.instances() == [_worker()]
    finally:
        await discovery.close()


def test_a_service_refuses_to_start_on_such_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "discovery"
    folder.mkdir()
    folder.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k != SHARED}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenyard.cli",
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--discovery",
            f"dir://{folder}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "writable by group or others" in line]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
