"""``tokenyard probe ADDRESS``: the container healthcheck (gRPC health, no extra binary).

With mTLS on (``--tls-*``, the TOKENYARD_TLS_* variables, or the TOKENYARD_<SERVICE>_TLS_*
variables of the service whose container it runs in), the probe presents that certificate and checks the server's against the address's host name, which
``tokenyard certs`` puts in every certificate for loopback (127.0.0.1, ::1, localhost).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenyard.common.tls import MTLS_SERVERS, PLAINTEXT, Tls, TlsError


def check(address: str, service: str = "", timeout: float = 2.0, tls: Tls = PLAINTEXT) -> str:
    """The serving status name at ``address`` (``UNREACHABLE`` when nothing answers)."""
    # A Unix socket (the gms) is never TLS: its file mode guards it.
    channel_tls = PLAINTEXT if address.startswith("unix:") else tls
    with channel_tls.sync_channel(address, None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            return (
                "UNREACHABLE"
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else code.name
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def env_tls_file(name: str) -> str:
    """The TLS file from TOKENYARD_TLS_<NAME>, else from the service this probe runs beside.

    A healthcheck runs in the service's own container, whose environment names its certificate
    with the service's prefix (TOKENYARD_ROUTER_TLS_CERT): presenting that one needs no flags.
    """
    shared = os.environ.get(f"TOKENYARD_TLS_{name.upper()}")
    if shared:
        return shared
    # Only services whose port requires mTLS: the frontend's container also names a certificate
    # (for its own calls to routers and workers), but its port serves plaintext.
    keys = [f"TOKENYARD_{service.upper()}_TLS_{name.upper()}" for service in sorted(MTLS_SERVERS)]
    found = {os.environ[k] for k in keys if os.environ.get(k)}
    return found.pop() if len(found) == 1 else ""


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenyard probe", description="Exit 0 iff the gRPC health check at ADDRESS answers SERVING."
    )
    parser.add_argument("address", help="host:port or unix:///path/to.sock")
    parser.add_argument("--service", default="", help="health service name (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait (default 2)")
    for name in ("ca", "cert", "key"):
        env = f"TOKENYARD_TLS_{name.upper()}"
        parser.add_argument(
            f"--tls-{name}",
            default=env_tls_file(name),
            help=f"mTLS {name} file (PEM) to dial a service that requires one [env {env}, else the "
            f"TOKENYARD_<SERVICE>_TLS_{name.upper()} of the router, worker or planner whose variable is set]",
        )
    args = parser.parse_args(argv)
    try:
        tls = Tls.from_paths(args.tls_ca, args.tls_cert, args.tls_key)
    except TlsError as exc:
        print(f"tokenyard probe: error: {exc}", file=sys.stderr)
        return 2
    status = check(args.address, args.service, args.timeout, tls)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
