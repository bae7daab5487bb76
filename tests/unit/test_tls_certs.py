"""Certificates of service identity (``tokenyard certs``) and reading the identity back."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from tokenyard.cli import main as cli_main
from tokenyard.common.certs import (
    IDENTITIES,
    CertError,
    create_ca,
    identity_from_uris,
    identity_of,
    issue,
    write_bundle,
)
from tokenyard.common.tls import Tls, TlsError, peer_identity

pytestmark = pytest.mark.unit


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_a_service_certificate_names_its_service_and_is_signed_by_the_ca() -> None:
    ca = create_ca()
    issued = issue(ca, "worker", dns=["localhost", "worker-0.example"], ips=["127.0.0.1", "10.1.2.3"])
    san = _san(issued.cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://tokenyard/worker"]
    assert san.get_values_for_type(x509.DNSName) == ["worker.tokenyard", "localhost", "worker-0.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    assert identity_of(issued.cert) == "worker"
    assert issued.cert.issuer == ca.cert.subject
    ca_key = ca.key.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    issued.cert.verify_directly_issued_by(ca.cert)
    assert not issued.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_certificate_of_another_ca_does_not_verify() -> None:
    issued = issue(create_ca(), "router")
    with pytest.raises(InvalidSignature):
        issued.cert.verify_directly_issued_by(create_ca().cert)


def test_unknown_identities_and_bad_addresses_are_refused() -> None:
    ca = create_ca()
    with pytest.raises(CertError, match="unknown identity 'root'"):
        issue(ca, "root")
    with pytest.raises(CertError, match="not an IP address: 'localhost'"):
        issue(ca, "router", ips=["localhost"])


@pytest.mark.parametrize(
    ("uris", "identity"),
    [
        (["spiffe://tokenyard/router"], "router"),
        (["spiffe://tokenyard/admin", "https://example.com"], "admin"),
        ([], None),
        (["spiffe://other/router"], None),
        (["spiffe://tokenyard/root"], None),
        # Two identities in one certificate is one too many.
        (["spiffe://tokenyard/router", "spiffe://tokenyard/admin"], None),
    ],
)
def test_identity_from_uris(uris: list[str], identity: str | None) -> None:
    assert identity_from_uris(uris) == identity


def test_peer_identity_reads_the_auth_context_grpc_fills() -> None:
    assert peer_identity({"peer_uri": [b"spiffe://tokenyard/frontend"]}) == "frontend"
    # Cores that list every SAN under one key.
    sans = [b"spiffe://tokenyard/worker", b"worker.tokenyard", b"127.0.0.1"]
    assert peer_identity({"x509_subject_alternative_name": sans}) == "worker"
    assert peer_identity({"transport_security_type": [b"insecure"]}) is None
    assert peer_identity({}) is None


def test_write_bundle_keeps_keys_private_and_reuses_its_ca(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    written = write_bundle(out, ["router", "worker"])
    assert {p.name for p in written} == {
        "ca.crt",
        "ca.key",
        "router.crt",
        "router.key",
        "worker.crt",
        "worker.key",
    }
    for key in ("ca.key", "router.key", "worker.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    router = (out / "router.crt").read_bytes()
    # Again: nothing to do; a new identity is signed by the same CA.
    assert write_bundle(out, ["router", "worker"]) == []
    assert [p.name for p in write_bundle(out, ["admin"])] == ["admin.crt", "admin.key"]
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    x509.load_pem_x509_certificate((out / "admin.crt").read_bytes()).verify_directly_issued_by(ca)
    assert (out / "router.crt").read_bytes() == router
    assert [p.name for p in write_bundle(out, ["router"], force=True)] == ["router.crt", "router.key"]
    assert (out / "router.crt").read_bytes() != router


def test_the_certs_command_writes_every_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert cli_main(["certs", "--out", str(out), "--ip", "10.0.0.7", "--dns", "tokenyard.internal"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 + 2 * len(IDENTITIES)
    for identity in IDENTITIES:
        cert = x509.load_pem_x509_certificate((out / f"{identity}.crt").read_bytes())
        assert identity_of(cert) == identity
        assert ipaddress.ip_address("10.0.0.7") in _san(cert).get_values_for_type(x509.IPAddress)
        assert "tokenyard.internal" in _san(cert).get_values_for_type(x509.DNSName)
    assert cli_main(["certs", "--out", str(out), "--ip", "nope"]) == 1
    assert "not an IP address: 'nope'" in capsys.readouterr().err


def test_tls_settings_need_all_three_files(tmp_path: Path) -> None:
    assert not Tls.from_paths("", "", "").enabled
    with pytest.raises(TlsError, match="missing --tls-key"):
        Tls.from_paths("ca.crt", "router.crt", "")
    with pytest.raises(TlsError, match="cannot read the CA certificate"):
        Tls.from_paths(str(tmp_path / "none.crt"), str(tmp_path / "a"), str(tmp_path / "b"))
    write_bundle(tmp_path, ["router"])
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(TlsError, match=r"junk\.key' is not PEM"):
        Tls.from_paths(str(tmp_path / "ca.crt"), str(tmp_path / "router.crt"), str(tmp_path / "junk.key"))
    tls = Tls.from_paths(str(tmp_path / "ca.crt"), str(tmp_path / "router.crt"), str(tmp_path / "router.key"))
    assert tls.enabled and tls.server_credentials() is not None
    assert tls.files is not None and tls.files.identity == "router"


def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["router", "worker"])
    with pytest.raises(TlsError, match=r"worker\.key' does not belong to the certificate"):
        Tls.from_paths(str(tmp_path / "ca.crt"), str(tmp_path / "router.crt"), str(tmp_path / "worker.key"))
