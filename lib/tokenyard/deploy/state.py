"""Where a local deployment keeps its state: pid files, the gms socket, the ready marker, logs.

Not the current folder: ``tokenyard down`` and ``tokenyard status`` must find the deployment from
anywhere. ``$TOKENYARD_HOME`` when set (as for discovery); else ``$XDG_RUNTIME_DIR/tokenyard``
(per user, on a tmpfs cleared at logout); else ``~/.local/state/tokenyard``. ``--state-dir`` /
``TOKENYARD_UP_STATE_DIR`` overrides all three.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PID_FILE = "up.pid"
READY_FILE = "up.ready"
LOG_FILE = "up.log"
# What a stopped deployment leaves behind unless removed: its own markers, the gms sockets and
# the pid files of the planner's workers. Logs stay (they say what happened).
_STALE_PATTERNS = (PID_FILE, READY_FILE, "*.sock", "*.sock.fds", "planner-workers/*.pid")


def default_state_dir() -> str:
    home = os.environ.get("TOKENYARD_HOME")
    if home:
        return str(Path(home).expanduser() / "state")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return str(Path(runtime) / "tokenyard")
    return str(Path.home() / ".local" / "state" / "tokenyard")


def prepare(state_dir: Path) -> Path:
    """Create the state folder (private to this user) and return its absolute path."""
    path = state_dir.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def running_pid(state_dir: Path) -> int | None:
    """The pid of the deployment that owns ``state_dir``, if that process still runs."""
    try:
        pid = int((state_dir / PID_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return None if _exited(pid) else pid


def _exited(pid: int) -> bool:
    """A zombie: the process has exited and waits for its parent to collect its status."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def remove_stale(state_dir: Path) -> list[Path]:
    """Remove what a stopped deployment leaves behind; returns what was removed."""
    removed: list[Path] = []
    for pattern in _STALE_PATTERNS:
        for path in state_dir.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
