"""`tokenyard up`'s handling of its children and what it prints: a child that dies while a
process it started still holds its output is restarted (and that process is stopped); with API
keys configured, the printed call examples send a key taken from where the keys come from,
without printing it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tokenyard.common.cli_settings import parse_settings
from tokenyard.deploy.up import Child, Deployment, UpSettings
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import FrontendServer

pytestmark = pytest.mark.integration

KEY = "sk-announced-0123456789abcdef"
OTHER = "sk-second-key-0123456789abcd"


def _deployment(tmp_path: Path) -> Deployment:
    settings, _ = parse_settings(
        UpSettings, ["--engine", "mocker", "--state-dir", str(tmp_path)], "tokenyard up", ""
    )
    return Deployment(settings)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent, the dead child, is not there to reap it).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


async def _until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for _ in iter(lambda: check() or time.monotonic() > deadline, True):
        await asyncio.sleep(0.1)


async def test_a_child_whose_helper_holds_its_output_is_restarted(tmp_path: Path) -> None:
    pid_file = tmp_path / "helper.pid"
    # The child starts a helper that inherits its stdout, then dies; the helper lives on.
    script = (
        "import subprocess, sys\n"
        f"helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'a').write(f'{{helper.pid}}\\n')\n"
        "print('child going away', flush=True)\n"
        "sys.exit(3)\n"
    )
    deployment = _deployment(tmp_path)
    child = Child("dying", [sys.executable, "-c", script], "127.0.0.1:1")
    child.restarts = deployment.children[0].restarts
    deployment.children = [child]
    await deployment.spawn(child)
    keeper = asyncio.create_task(deployment.keep(child))
    try:
        await _until(lambda: child.restarts.recent >= 1 or keeper.done(), 20)
        assert child.restarts.recent >= 1, "the dead child was never restarted"
        assert "child going away" in child.tail
        first_helper = int(pid_file.read_text().split()[0])
        await _until(lambda: not _alive(first_helper), 5)
        assert not _alive(first_helper), "the dead child's helper was left running"
    finally:
        deployment.stopping.set()
        await asyncio.wait_for(keeper, 30)
        await deployment.stop()
        for line in pid_file.read_text().split() if pid_file.exists() else []:
            if _alive(int(line)):
                os.kill(int(line), 9)


def _announcement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    _deployment(tmp_path)._announce()
    return capsys.readouterr().out


def _shell_key(text: str, env: dict[str, str]) -> str:
    """Runs the announcement's `export KEY=...` line as printed; the key it yields."""
    (line,) = [x.strip() for x in text.splitlines() if x.strip().startswith("export KEY=")]
    done = subprocess.run(
        ["bash", "-c", f'{line}\nprintf %s "$KEY"'],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.mark.parametrize("variable", ["TOKENYARD_API_KEYS", "TOKENYARD_FRONTEND_API_KEYS"])
def test_examples_send_a_key_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.delenv("TOKENYARD_FRONTEND_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("TOKENYARD_API_KEYS", raising=False)
    monkeypatch.delenv("TOKENYARD_FRONTEND_API_KEYS", raising=False)
    monkeypatch.setenv(variable, f" {KEY} ,{OTHER}")
    text = _announcement(tmp_path, capsys)
    assert KEY not in text and OTHER not in text
    assert "unused" not in text
    assert f"${variable}" in text
    assert '-H "Authorization: Bearer $KEY"' in text
    assert 'api_key=os.environ["KEY"]' in text
    assert 'headers={"authorization": "Bearer " + os.environ["KEY"]}' in text
    assert _shell_key(text, {variable: f" {KEY} ,{OTHER}"}) == KEY


def test_examples_send_a_key_from_the_keys_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "my keys"
    keys.write_text(f"# the team's keys\n\n  {KEY}\n{OTHER}\n")
    monkeypatch.delenv("TOKENYARD_API_KEYS", raising=False)
    monkeypatch.delenv("TOKENYARD_FRONTEND_API_KEYS", raising=False)
    monkeypatch.setenv("TOKENYARD_FRONTEND_API_KEYS_FILE", str(keys))
    text = _announcement(tmp_path, capsys)
    assert KEY not in text and "unused" not in text
    assert '-H "Authorization: Bearer $KEY"' in text
    assert _shell_key(text, {}) == KEY


def test_without_keys_the_examples_need_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TOKENYARD_API_KEYS", "TOKENYARD_FRONTEND_API_KEYS", "TOKENYARD_FRONTEND_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    text = _announcement(tmp_path, capsys)
    assert "Authorization" not in text and "export KEY" not in text
    assert 'api_key="unused"' in text


async def test_the_printed_examples_get_past_the_frontends_key_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The announcement's shell (curl) and Python (openai) examples, run as printed against a
    frontend that needs a key: neither is refused for its key. (No worker serves the model here:
    the frontend's answer past the key check is that the model does not exist.)"""
    monkeypatch.delenv("TOKENYARD_FRONTEND_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("TOKENYARD_FRONTEND_API_KEYS", raising=False)
    monkeypatch.setenv("TOKENYARD_API_KEYS", f"{KEY},{OTHER}")
    settings = FrontendSettings(host="127.0.0.1", port=0, http_port=0, discovery="memory://", api_keys=KEY)
    async with FrontendServer(settings) as frontend:
        deployment = _deployment(tmp_path)
        deployment.settings.http_port = frontend.http_port
        deployment._announce()
        text = capsys.readouterr().out
        shell = text.split("try it:\n", 1)[1].split("\n\n" + sys.executable, 1)[0]
        python = text.split(f"{sys.executable} - <<'EOF'\n", 2)[1].split("\nEOF\n", 1)[0]
        script = f"{shell}\n{sys.executable} - <<'EOF'\n{python}\nEOF\n"
        env = {"PATH": os.environ["PATH"], "TOKENYARD_API_KEYS": f"{KEY},{OTHER}"}
        done = await asyncio.create_subprocess_exec(
            "bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(done.communicate(), 60)
    said = out.decode()
    # Both examples answered: curl's JSON and openai's NotFoundError.
    assert said.count("does not exist") >= 2 and "NotFoundError" in said, said
    assert "invalid_api_key" not in said and "401" not in said, said
