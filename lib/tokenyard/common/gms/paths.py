"""Where a gms listens: the gRPC socket, and its descriptor socket next to it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FD_SOCKET_SUFFIX = ".fds"


def default_socket() -> str:
    """The gRPC socket of the device's gms when none is configured."""
    return str(Path(tempfile.gettempdir()) / f"tokenyard-{os.getuid()}" / "gms-0.sock")


def fd_socket_path(socket: str | os.PathLike[str]) -> str:
    """The descriptor socket (SCM_RIGHTS) that serves the gms listening on ``socket``."""
    return os.fspath(socket) + FD_SOCKET_SUFFIX
