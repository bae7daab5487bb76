"""``tokenyard certs``: a CA and per-service certificates for mTLS between services."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenyard.common.certs import (
    ADMIN,
    DEFAULT_DAYS,
    DEFAULT_DNS,
    DEFAULT_IPS,
    IDENTITIES,
    SERVICES,
    CertError,
    service_dns,
    service_uri,
    write_bundle,
)
from tokenyard.common.tls import Tls

DESCRIPTION = f"""\
Create a private CA and one certificate per identity in OUT (ca.crt, ca.key, <identity>.crt,
<identity>.key; keys are written 0600). Each certificate names its identity as the URI SAN
{service_uri("<identity>")} (servers check it against the RPC called) and the DNS SAN
{service_dns("<identity>")} (clients ask for it when they dial an instance found in discovery),
plus the loopback names and addresses below, so probes can dial 127.0.0.1.

Identities: {", ".join(IDENTITIES)} ("admin" is the operator's: Drain, router dumps, planner RPCs).
A CA already in OUT is reused and existing certificates are kept (use --force to reissue them).

Then start each service with --tls-ca OUT/ca.crt --tls-cert OUT/<service>.crt
--tls-key OUT/<service>.key (or TOKENYARD_TLS_CA, TOKENYARD_TLS_CERT, TOKENYARD_TLS_KEY).
Keep ca.key off the machines that run services: it mints identities."""


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenyard certs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="certs", help="folder to write into (default: ./certs)")
    parser.add_argument(
        "--identity",
        action="append",
        choices=IDENTITIES,
        metavar="NAME",
        help=f"issue only this identity (repeatable; default: all of {', '.join(IDENTITIES)})",
    )
    parser.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help=f"extra DNS name for every certificate (repeatable; default: {', '.join(DEFAULT_DNS)})",
    )
    parser.add_argument(
        "--ip",
        action="append",
        metavar="ADDRESS",
        help=f"extra IP address for every certificate (repeatable; default: {', '.join(DEFAULT_IPS)})",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    parser.add_argument("--force", action="store_true", help="reissue certificates that already exist")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        written = write_bundle(
            out,
            args.identity or IDENTITIES,
            dns=[*DEFAULT_DNS, *(args.dns or ())],
            ips=[*DEFAULT_IPS, *(args.ip or ())],
            days=args.days,
            force=args.force,
        )
    except (CertError, OSError) as exc:
        print(f"tokenyard certs: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    if not written:
        print(f"nothing to do: every certificate exists in {out} (--force reissues them)")
    return 0


@contextlib.contextmanager
def throwaway_tls(folder: Path) -> Iterator[Tls]:
    """A fresh CA and certificates in ``folder`` for one local deployment, removed afterwards.

    Every service's TOKENYARD_<SERVICE>_TLS_* variable is set in this process's environment, so
    that each child (and every worker the planner starts later) picks its own certificate. Yields
    the admin's credentials, for the supervisor's health checks.
    """
    shutil.rmtree(folder, ignore_errors=True)
    write_bundle(folder, IDENTITIES, days=30)
    for service in SERVICES:
        for name, file in (("CA", "ca.crt"), ("CERT", f"{service}.crt"), ("KEY", f"{service}.key")):
            os.environ[f"TOKENYARD_{service.upper()}_TLS_{name}"] = str(folder / file)
    # The CA's key is not needed once everything is issued: nothing can mint more identities.
    (folder / "ca.key").unlink()
    try:
        yield Tls.from_paths(
            str(folder / "ca.crt"), str(folder / f"{ADMIN}.crt"), str(folder / f"{ADMIN}.key")
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
