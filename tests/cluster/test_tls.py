"""TLS in front of the real Serve gRPC proxy (session multi-node Ray cluster): a real nginx on
loopback terminates TLS (and mTLS) and forwards plain HTTP/2 to Serve's proxy port.

Greedy text through the TLS front equals the text straight from the proxy; a plaintext client or
one that does not trust the server's CA fails with UNAVAILABLE; with mTLS a client without a
certificate of the client CA is refused with UNAUTHENTICATED, one with it streams. (API keys
through the front are checked against the coordinator's grpc.aio server in
tests/integration/test_tls_proxy.py; the session stack runs without keys.)
"""

from __future__ import annotations

import grpc
import pytest

from eft_serve.client import EftClient
from eft_serve.infra.tls_proxy import TlsProxy, TlsProxySpec
from eft_serve.testing.tls_certs import make_test_pki

pytestmark = pytest.mark.cluster

PROMPT = "Q: What is the river of Vorlék?\nA:"


def _text(client: EftClient) -> tuple[str, int]:
    msgs = list(client.generate(PROMPT, temperature=0, max_new_tokens=12, ignore_eos=True))
    return "".join(m.text for m in msgs), msgs[-1].usage.completion_tokens


def test_generate_through_tls_and_mtls_in_front_of_the_serve_proxy(cluster_stack, tmp_path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    upstream = cluster_stack["address"]
    cfg = cluster_stack["config"]
    read_timeout = (cfg.grpc.request_timeout_s or cfg.coordinator.default_timeout_s) + 10
    with EftClient(upstream, timeout=120) as direct:
        expected, n = _text(direct)
    assert n == 12 and expected

    spec = TlsProxySpec(
        upstream=upstream,
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        read_timeout_s=read_timeout,
    )
    with TlsProxy(spec) as front:
        with EftClient(front.address, timeout=120, api_key="eft_unused", ca_cert=str(pki.ca_cert)) as c:
            assert _text(c) == (expected, 12)
            assert c.health() == 1
        for kwargs in ({}, {"ca_cert": str(pki.other_ca_cert)}):  # plaintext; a CA that did not sign it
            with EftClient(front.address, timeout=30, **kwargs) as c, pytest.raises(grpc.RpcError) as err:
                _text(c)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (kwargs, err.value.details())

    mtls = TlsProxySpec(
        upstream=upstream,
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        client_ca_file=str(pki.ca_cert),
        read_timeout_s=read_timeout,
    )
    with TlsProxy(mtls) as front:
        with EftClient(front.address, timeout=30, ca_cert=str(pki.ca_cert)) as c, pytest.raises(grpc.RpcError) as err:
            _text(c)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        assert "client certificate" in (err.value.details() or "")
        cert = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
        with EftClient(front.address, timeout=120, ca_cert=str(pki.ca_cert), **cert) as c:
            assert _text(c) == (expected, 12)
