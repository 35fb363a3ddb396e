"""Throwaway TLS material for tests: a CA, a server certificate for loopback, client certificates.

Owns: writing PEM files (`make_test_pki`) with the `cryptography` package (a dev dependency).
Keys are short-lived EC P-256, certificates valid for one day. Never for production: the CA key
sits next to the certificates in a temporary directory.
Does NOT know: nginx or gRPC (see `infra/tls_proxy.py` and the client's TLS options).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ThrowawayPki:
    """Paths of one throwaway PKI (all PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A second, unrelated CA and a client certificate it signed: "wrong CA" cases.
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    cert = (
        _builder(cn, _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    cn: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    usage: x509.ObjectIdentifier,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    builder = (
        _builder(cn, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_test_pki(directory: Path, server_ips: tuple[str, ...] = ("127.0.0.1",)) -> ThrowawayPki:
    """CA + server cert (SANs: `server_ips`, localhost) + a client cert, and an unrelated CA + client."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("EFT Serve test CA")
    server_key, server_cert = _leaf(
        "eft-serve test server", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH, ips=server_ips, dns=("localhost",)
    )
    client_key, client_cert = _leaf("eft-serve test client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    other_key, other_cert = _ca("unrelated test CA")
    stranger_key, stranger_cert = _leaf("stranger", other_key, other_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    pki = ThrowawayPki(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        other_ca_cert=directory / "other-ca.pem",
        other_client_cert=directory / "other-client.pem",
        other_client_key=directory / "other-client-key.pem",
    )
    _write_cert(ca_cert, pki.ca_cert)
    _write_cert(server_cert, pki.server_cert)
    _write_key(server_key, pki.server_key)
    _write_cert(client_cert, pki.client_cert)
    _write_key(client_key, pki.client_key)
    _write_cert(other_cert, pki.other_ca_cert)
    _write_cert(stranger_cert, pki.other_client_cert)
    _write_key(stranger_key, pki.other_client_key)
    return pki
