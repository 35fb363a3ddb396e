"""Throwaway TLS material for tests: a CA, a server certificate for loopback, client certificates.

Owns: the files of one throwaway PKI (`make_test_pki`, PEM) and what each is for; the certificates
themselves are `trustme`'s (a dev dependency): EC P-256 keys, leaf certificates good for client
and server authentication. Never for production: nothing here protects a key.
Does NOT know: nginx or gRPC (see `infra/tls_proxy.py` and the client's TLS options).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


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


def _write_leaf(cert: trustme.LeafCert, cert_path: Path, key_path: Path) -> None:
    cert.cert_chain_pems[0].write_to_path(cert_path)
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(cert_path, append=True)
    cert.private_key_pem.write_to_path(key_path)


def make_test_pki(directory: Path, server_ips: tuple[str, ...] = ("127.0.0.1",)) -> ThrowawayPki:
    """CA + server cert (SANs: `server_ips`, localhost) + a client cert, and an unrelated CA + client."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="EFT Serve test CA")
    other = trustme.CA(organization_name="unrelated test CA")
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
    ca.cert_pem.write_to_path(pki.ca_cert)
    other.cert_pem.write_to_path(pki.other_ca_cert)
    server = ca.issue_cert(*server_ips, "localhost", common_name="eft-serve test server")
    _write_leaf(server, pki.server_cert, pki.server_key)
    # Client certificates name no host: a reserved name stands in for their identity.
    client = ca.issue_cert("client.eft-serve.invalid", common_name="eft-serve test client")
    _write_leaf(client, pki.client_cert, pki.client_key)
    stranger = other.issue_cert("stranger.invalid", common_name="stranger")
    _write_leaf(stranger, pki.other_client_cert, pki.other_client_key)
    return pki
