"""gms process wiring: gRPC over a Unix socket, the descriptor socket next to it, one lock domain
per tag, and the memory backend of the device.

Start order: the backend, then the descriptor socket, then gRPC and discovery; health turns
SERVING last, so a SERVING gms answers on both sockets. Stop: gRPC stops (Lock calls end, so
every session ends and uncommitted builds abort), then the descriptor socket closes and every
allocation is freed; mappings that clients hold stay valid until they unmap.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path

from tokenyard.api.gms.v1 import gms_pb2_grpc
from tokenyard.common.gms.paths import fd_socket_path
from tokenyard.common.service import ServiceRuntime, StartupError
from tokenyard.gms.backend import BackendError, backend_for
from tokenyard.gms.config import GmsSettings
from tokenyard.gms.fd_server import DescriptorServer
from tokenyard.gms.manager import MemoryManager
from tokenyard.gms.metrics import GmsMetrics
from tokenyard.gms.servicer import SERVICE_NAME, GmsServicer

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
    fd_path = Path(fd_socket_path(path))
    prepare_socket(path)
    prepare_socket(fd_path)
    try:
        backend = backend_for(settings.device, reserve=settings.reserve, max_bytes=settings.max_bytes)
    except BackendError as exc:
        raise StartupError(f"{exc} (--device / TOKENYARD_GMS_DEVICE)") from None
    tags = settings.tag_list()
    async with ServiceRuntime(
        settings,
        service="gms",
        metrics_port=settings.metrics_port,
        listen_address=f"unix://{path}",
        # A Unix socket, guarded by its file mode; memfds cannot cross a network anyway.
        peer_auth=False,
        metadata={"device": settings.device, "tags": settings.tags},
    ) as runtime:
        metrics = GmsMetrics(runtime.metrics, tags)
        manager = MemoryManager(
            backend,
            tags,
            settings.device,
            retry_interval=settings.alloc_retry_interval,
            retry_timeout=settings.alloc_retry_timeout,
            max_bytes=settings.max_bytes,
            metrics=metrics,
        )
        descriptors = DescriptorServer(fd_path, manager, metrics)
        runtime.add_servicer(
            gms_pb2_grpc.add_GmsServiceServicer_to_server, GmsServicer(manager), SERVICE_NAME
        )

        async def remove_socket() -> None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # noqa: ASYNC240 - one unlink at shutdown

        async def free_memory() -> None:
            manager.close()

        # Closers run in reverse: the socket file goes, then descriptors stop, then memory is freed.
        runtime.on_close(free_memory)
        runtime.on_close(descriptors.close)
        runtime.on_close(remove_socket)
        try:
            await descriptors.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {fd_path} (--socket / TOKENYARD_GMS_SOCKET): {exc.strerror or exc}"
            ) from None
        await runtime.start()
        log.info(
            "gms serving %s memory of %s (%s); descriptors on %s",
            ",".join(t.value for t in tags),
            settings.device,
            backend.kind.value,
            fd_path,
        )
        runtime.set_serving(True)
        await runtime.wait_for_shutdown()
        # Lock calls last as long as their sessions: end them here, or stopping the server
        # would cancel them mid-call.
        manager.shutdown()
