"""mTLS between services: server credentials, client channels and the peer's identity.

One :class:`Tls` per process, built from the ``--tls-ca/--tls-cert/--tls-key`` settings, makes
both ends of every service-to-service connection:

* servers take only clients that present a certificate signed by the deployment's CA
  (``require_client_auth``); which RPCs a peer may call is decided by its identity
  (:mod:`tokenyard.common.access`);
* clients present this process's certificate and ask for the peer's service name as the TLS
  target name (``<service>.tokenyard``), so a connection to an instance found in discovery fails
  its handshake unless that instance holds a certificate of the service it registered as.

Without the settings every channel and port is plaintext, as before (loopback default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tokenyard.common.certs import SPIFFE_PREFIX, identity_from_uris, identity_of, service_dns

# The services whose gRPC port takes only mTLS clients when TLS is on. The frontend's serves
# clients (API keys) and the gms's is a Unix socket guarded by its file mode: both stay plaintext.
MTLS_SERVERS = frozenset({"router", "worker", "planner"})


class TlsError(Exception):
    """The TLS settings cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, ca: str, cert: str, key: str) -> TlsFiles:
        def read(path: str, what: str) -> bytes:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise TlsError(f"cannot read the {what} {path!r}: {exc.strerror or exc}") from None
            if b"-----BEGIN" not in data:
                raise TlsError(f"the {what} {path!r} is not PEM")
            return data

        files = cls(read(ca, "CA certificate"), read(cert, "certificate"), read(key, "private key"))
        try:
            certificate = x509.load_pem_x509_certificate(files.cert)
            private_key = serialization.load_pem_private_key(files.key, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsError(f"cannot load {cert!r} with {key!r}: {exc}") from None
        # A mismatched pair would only show as failed handshakes on the peers' side.
        if certificate.public_key() != private_key.public_key():
            raise TlsError(f"the private key {key!r} does not belong to the certificate {cert!r}")
        return files

    @property
    def identity(self) -> str | None:
        """The identity the certificate names (``spiffe://tokenyard/<identity>``)."""
        return identity_of(x509.load_pem_x509_certificate(self.cert))


class Tls:
    """This process's certificate and the CA it trusts; ``None`` files means plaintext."""

    def __init__(self, files: TlsFiles | None = None) -> None:
        self.files = files
        self._channel_creds = (
            grpc.ssl_channel_credentials(files.ca, files.key, files.cert) if files is not None else None
        )

    @classmethod
    def from_paths(cls, ca: str, cert: str, key: str) -> Tls:
        if not (ca or cert or key):
            return cls(None)
        missing = [name for name, value in (("ca", ca), ("cert", cert), ("key", key)) if not value]
        if missing:
            raise TlsError(
                "TLS needs all of --tls-ca, --tls-cert and --tls-key; missing "
                + ", ".join(f"--tls-{m}" for m in missing)
            )
        return cls(TlsFiles.load(ca, cert, key))

    @property
    def enabled(self) -> bool:
        return self.files is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.files is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.files.key, self.files.cert)], root_certificates=self.files.ca, require_client_auth=True
        )

    def _options(self, peer: str | None, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        out = list(options)
        if self._channel_creds is not None and peer:
            # Checked against the certificate's DNS SANs in place of the address's host name:
            # what matters is which service answers, not which IP it has today.
            out.append(("grpc.ssl_target_name_override", service_dns(peer)))
        return out

    def channel(
        self, address: str, peer: str | None, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """An aio channel to an instance of service ``peer`` (None: check the address's host name)."""
        if self._channel_creds is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, self._channel_creds, options=self._options(peer, options))

    def sync_channel(
        self, address: str, peer: str | None, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.Channel:
        if self._channel_creds is None:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, self._channel_creds, options=self._options(peer, options))


PLAINTEXT = Tls(None)


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The identity in the verified client certificate of a call (None without one).

    gRPC fills the auth context only after the handshake verified the chain against the CA, so
    the SAN read here is as trustworthy as the CA's key.
    """
    uris = [v.decode(errors="replace") for v in auth_context.get("peer_uri", ())]
    if not uris:
        # Older gRPC cores list every SAN under one key; the SPIFFE URI is among them.
        sans = auth_context.get("x509_subject_alternative_name", ())
        uris = [v.decode(errors="replace") for v in sans if v.startswith(SPIFFE_PREFIX.encode())]
    return identity_from_uris(uris)
