"""``tokenyard status``: what is registered in discovery, and whether each instance is healthy."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field

from tokenyard.common.cli_settings import parse_settings
from tokenyard.common.discovery import DiscoveryError, Instance, open_discovery
from tokenyard.common.settings import TlsSettings, default_discovery_url, settings_config
from tokenyard.common.tls import MTLS_SERVERS, PLAINTEXT, Tls, TlsError


class StatusSettings(TlsSettings):
    model_config = settings_config("status")
    service_name: ClassVar[str] = "status"

    discovery: str = Field(default_factory=default_discovery_url, description="Discovery backend to read.")
    service: str = Field(default="", description="Only list instances of this service.")
    timeout: float = Field(default=1.0, gt=0, le=60, description="Seconds to wait for each health check.")
    json_output: bool = Field(default=False, description="Print JSON lines instead of a table.")


async def health_of(address: str, timeout: float, tls: Tls = PLAINTEXT, peer: str | None = None) -> str:
    """The health status at ``address``; ``peer`` is the service the certificate must name (TLS)."""
    async with tls.channel(address, peer) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return "UNREACHABLE"
            return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def service_health(address: str, service: str, timeout: float, tls: Tls = PLAINTEXT) -> str:
    """The health of an instance of ``service``, with TLS where that service's port requires it."""
    if service in MTLS_SERVERS:
        return await health_of(address, timeout, tls, service)
    return await health_of(address, timeout)


async def collect(settings: StatusSettings) -> list[tuple[Instance, str]]:
    tls = Tls.from_paths(settings.tls_ca, settings.tls_cert, settings.tls_key)
    discovery = open_discovery(settings.discovery)
    try:
        instances = await discovery.instances(settings.service or None)
    finally:
        await discovery.close()
    instances.sort(key=lambda i: (i.service, i.address))
    healths = await asyncio.gather(
        *(service_health(i.address, i.service, settings.timeout, tls) for i in instances)
    )
    return list(zip(instances, healths, strict=True))


def main(argv: Sequence[str]) -> int:
    settings, _ = parse_settings(
        StatusSettings, argv, "tokenyard status", "List registered instances and their gRPC health."
    )
    try:
        rows = asyncio.run(collect(settings))
    except DiscoveryError as exc:
        print(f"tokenyard status: error: discovery {settings.discovery!r}: {exc}", file=sys.stderr)
        return 1
    except TlsError as exc:
        print(f"tokenyard status: error: {exc}", file=sys.stderr)
        return 1
    if settings.json_output:
        for inst, state in rows:
            doc = json.loads(inst.to_json())
            doc["health"] = state
            print(json.dumps(doc))
        return 0
    if not rows:
        print(f"no instances registered in {settings.discovery}")
        return 0
    header = ("SERVICE", "ROLE", "INSTANCE", "ADDRESS", "METRICS", "MODEL", "HEALTH")
    table = [header] + [
        (
            i.service,
            i.role or "-",
            str(i.instance_id),
            i.address,
            i.metrics_address or "-",
            i.model_card.model if i.model_card else "-",
            state,
        )
        for i, state in rows
    ]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    unhealthy = sum(1 for _, state in rows if state != "SERVING")
    if not settings.tls_ca and any(i.service in MTLS_SERVERS and st == "UNREACHABLE" for i, st in rows):
        print(
            "note: with mTLS on, routers, workers and planners answer only a client with a certificate: "
            "set TOKENYARD_TLS_CA, TOKENYARD_TLS_CERT and TOKENYARD_TLS_KEY (the admin's)",
            file=sys.stderr,
        )
    return 1 if unhealthy else 0
