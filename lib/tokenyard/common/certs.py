"""Certificates of service identity: a private CA and one certificate per service.

A certificate names the service it was issued to twice, for the two ends of a connection:

* a URI SAN ``spiffe://tokenyard/<service>``, which servers read from the peer's certificate to
  decide which RPCs it may call (:mod:`tokenyard.common.access`);
* a DNS SAN ``<service>.tokenyard``, which clients ask for as the TLS target name, so that the
  handshake itself fails unless the server really is the service its discovery record claims.

Loopback addresses and names (and any others given) are added as SANs too, so that tools that
dial an address without knowing the service (``tokenyard probe``) can check the certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The identities a certificate can carry: the services, plus the operator's ``admin``.
SERVICES = ("frontend", "router", "worker", "planner", "gms")
ADMIN = "admin"
IDENTITIES = (*SERVICES, ADMIN)
SPIFFE_PREFIX = "spiffe://tokenyard/"
DNS_SUFFIX = ".tokenyard"
DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")
DEFAULT_DAYS = 365

Ip = ipaddress.IPv4Address | ipaddress.IPv6Address


class CertError(Exception):
    """A certificate could not be made or read; the message says which file and why."""


def service_uri(identity: str) -> str:
    return f"{SPIFFE_PREFIX}{identity}"


def service_dns(identity: str) -> str:
    """The name a client asks for when it dials an instance of ``identity``."""
    return f"{identity}{DNS_SUFFIX}"


def check_identity(identity: str) -> str:
    if identity not in IDENTITIES:
        raise CertError(f"unknown identity {identity!r}: one of {', '.join(IDENTITIES)}")
    return identity


def identity_from_uris(uris: Iterable[str]) -> str | None:
    """The identity named by a certificate's URI SANs (None when it names none or several)."""
    found = {uri[len(SPIFFE_PREFIX) :] for uri in uris if uri.startswith(SPIFFE_PREFIX)}
    if len(found) != 1:
        return None
    (identity,) = found
    return identity if identity in IDENTITIES else None


def identity_of(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return identity_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: every TLS stack gRPC links supports it, and it is fast to generate in tests.
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(name: str = "Tokenyard CA", days: int = DEFAULT_DAYS) -> Issued:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def parse_ips(values: Iterable[str]) -> list[Ip]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_address(value))
        except ValueError:
            raise CertError(f"not an IP address: {value!r}") from None
    return out


def issue(
    ca: Issued,
    identity: str,
    *,
    dns: Sequence[str] = DEFAULT_DNS,
    ips: Sequence[str] = DEFAULT_IPS,
    days: int = DEFAULT_DAYS,
) -> Issued:
    """A certificate for ``identity`` signed by ``ca``, good as both TLS server and client."""
    check_identity(identity)
    key = _new_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(service_uri(identity)),
        x509.DNSName(service_dns(identity)),
        *(x509.DNSName(d) for d in dict.fromkeys(dns) if d),
        *(x509.IPAddress(ip) for ip in parse_ips(dict.fromkeys(ips))),
    ]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tokenyard"),
                    x509.NameAttribute(NameOID.COMMON_NAME, identity),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode, so a private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def load_ca(folder: Path) -> Issued:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot read the CA in {folder} (ca.crt, ca.key): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{folder / 'ca.key'}: not an EC key made by tokenyard certs")
    return Issued(key, cert)


def write_bundle(
    folder: Path,
    identities: Sequence[str] = IDENTITIES,
    *,
    dns: Sequence[str] = DEFAULT_DNS,
    ips: Sequence[str] = DEFAULT_IPS,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Write ``ca.crt``/``ca.key`` (or reuse the CA already there) and ``<identity>.crt/.key``.

    Existing certificates are kept unless ``force``: rerunning adds what is missing without
    invalidating what was handed out. Returns the files written.
    """
    for identity in identities:
        check_identity(identity)
    if days < 1:
        raise CertError("--days must be at least 1")
    parse_ips(ips)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    if (folder / "ca.crt").exists() and (folder / "ca.key").exists():
        ca = load_ca(folder)
    else:
        ca = create_ca(days=days)
        _write(folder / "ca.key", ca.key_pem(), 0o600)
        _write(folder / "ca.crt", ca.cert_pem(), 0o644)
        written += [folder / "ca.crt", folder / "ca.key"]
        force = True  # certificates of an earlier CA would not verify against this one
    for identity in identities:
        crt, key = folder / f"{identity}.crt", folder / f"{identity}.key"
        if crt.exists() and key.exists() and not force:
            continue
        issued = issue(ca, identity, dns=dns, ips=ips, days=days)
        _write(key, issued.key_pem(), 0o600)
        _write(crt, issued.cert_pem(), 0o644)
        written += [crt, key]
    return written
