"""gms process wiring: gRPC over a Unix socket (one per device and tag)."""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path

from tokenyard.common.service import ServiceRuntime, StartupError
from tokenyard.gms.config import GmsSettings
from tokenyard.gms.servicer import SERVICE_NAME, GmsServicer
from tokenyard.gms.v1 import gms_pb2_grpc

log = logging.getLogger(__name__)


def prepare_socket(path: Path) -> None:
    """Create the socket's folder; remove a stale socket file, refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        log.info("removing stale socket %s", path)
        path.unlink()
    else:
        raise StartupError(f"another gms is serving on {path} (--socket / TOKENYARD_GMS_SOCKET)")
    finally:
        probe.close()


async def serve(settings: GmsSettings) -> None:
    path = Path(settings.socket)
    prepare_socket(path)
    async with ServiceRuntime(
        settings, service="gms", metrics_port=settings.metrics_port, listen_address=f"unix://{path}"
    ) as runtime:
        runtime.add_servicer(
            gms_pb2_grpc.add_GmsServiceServicer_to_server, GmsServicer(settings.device), SERVICE_NAME
        )

        async def remove_socket() -> None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # noqa: ASYNC240 - one unlink at shutdown

        runtime.on_close(remove_socket)
        await runtime.start()
        runtime.set_serving(True)
        await runtime.wait_for_shutdown()
