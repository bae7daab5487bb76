"""Restart policy and state folder of `tokenyard up`; the rate-limited log of accept errors; server
options where a service's own value wins."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from tokenyard.common.cli_settings import parse_settings
from tokenyard.common.service import SERVER_OPTIONS, merged_options
from tokenyard.deploy import state
from tokenyard.deploy.supervisor import RestartPolicy, RestartTracker, describe_exit
from tokenyard.deploy.up import Deployment, UpSettings
from tokenyard.frontend.connections import RateLimitedLog

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_then_gives_up_within_the_window() -> None:
    clock = Clock()
    tracker = RestartTracker(
        RestartPolicy(max_restarts=3, window=60, initial_backoff=0.5, max_backoff=1.5), clock
    )
    assert [tracker.next_delay() for _ in range(3)] == [0.5, 1.0, 1.5]
    assert tracker.next_delay() is None
    # Restarts older than the window no longer count: a child that ran a while starts afresh.
    clock.now += 61
    assert tracker.next_delay() == 0.5
    assert tracker.total == 4


def test_no_restarts_allowed_gives_up_at_once() -> None:
    assert RestartTracker(RestartPolicy(max_restarts=0)).next_delay() is None


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_the_state_folder_is_the_users_runtime_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TOKENYARD_HOME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert state.default_state_dir() == str(tmp_path / "tokenyard")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert state.default_state_dir() == str(Path.home() / ".local" / "state" / "tokenyard")
    monkeypatch.setenv("TOKENYARD_HOME", str(tmp_path / "home"))
    assert state.default_state_dir() == str(tmp_path / "home" / "state")


def test_a_stop_leaves_no_pid_file_or_socket(tmp_path: Path) -> None:
    folder = state.prepare(tmp_path / "s")
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in ("up.pid", "up.ready", "gms-0.sock", "gms-0.sock.fds", "up.log"):
        (folder / name).write_text("x")
    (folder / "planner-workers").mkdir()
    (folder / "planner-workers" / "worker-64.pid").write_text("1")
    state.remove_stale(folder)
    assert sorted(p.name for p in folder.rglob("*")) == ["planner-workers", "up.log"]


def test_a_pid_file_counts_only_while_its_process_runs(tmp_path: Path) -> None:
    (tmp_path / state.PID_FILE).write_text(f"{os.getpid()}\n")
    assert state.running_pid(tmp_path) == os.getpid()
    (tmp_path / state.PID_FILE).write_text("999999999\n")
    assert state.running_pid(tmp_path) is None


def test_accept_errors_are_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    errors = RateLimitedLog("accepting failed", interval=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tokenyard.frontend.connections"):
        logged = [errors.note(OSError(24, "Too many open files")) for _ in range(1000)]
        clock.now += 10
        logged.append(errors.note(OSError(24, "Too many open files")))
    assert logged.count(True) == 2
    assert len(caplog.records) == 2
    assert "1000 in all" not in caplog.records[1].getMessage()
    assert (
        "1000 time(s)" in caplog.records[1].getMessage() and "1001 in all" in caplog.records[1].getMessage()
    )
    assert all(r.exc_info is None for r in caplog.records)


def test_a_services_own_server_option_wins() -> None:
    merged = dict(merged_options(SERVER_OPTIONS, [("grpc.max_receive_message_length", 1234)]))
    assert merged["grpc.max_receive_message_length"] == 1234
    assert merged["grpc.max_connection_idle_ms"] > 0
    assert len(merged_options(SERVER_OPTIONS, SERVER_OPTIONS)) == len(dict(SERVER_OPTIONS))


def test_the_printed_examples_name_the_virtualenvs_binaries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _ = parse_settings(
        UpSettings, ["--engine", "mocker", "--state-dir", str(tmp_path)], "tokenyard up", ""
    )
    Deployment(settings)._announce()
    text = capsys.readouterr().out
    bin_dir = Path(sys.executable).parent
    assert f"{sys.executable} - <<'EOF'" in text
    assert f"{bin_dir / 'tokenyard'} status" in text and f"{bin_dir / 'tokenyard'} down" in text
    assert "\npython -" not in text


def test_a_policy_that_restarts_the_first_crash_at_once_backs_off_from_the_second() -> None:
    clock = Clock()
    tracker = RestartTracker(
        RestartPolicy(max_restarts=4, window=60, initial_backoff=0.5, max_backoff=1.5, first_at_once=True),
        clock,
    )
    assert [tracker.next_delay() for _ in range(4)] == [0.0, 0.5, 1.0, 1.5]
    assert tracker.next_delay() is None
    clock.now += 61
    assert tracker.next_delay() == 0.0
