"""TLS and mTLS in front of a real gRPC server: a real nginx (`infra/tls_proxy.py`) on loopback,
throwaway certificates, the coordinator's grpc.aio server with API keys (fake-engine pools).

Every refusal is a clean gRPC status: plaintext or an untrusted server → UNAVAILABLE at the
client; mTLS without (or with a foreign) client certificate → UNAUTHENTICATED from nginx; an
upstream that is down → UNAVAILABLE; a body over the limit → RESOURCE_EXHAUSTED. API keys pass
through the front untouched (the coordinator still answers UNAUTHENTICATED without one).
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import add_key, load_key_store
from eft_serve.client import AsyncEftClient, EftClient
from eft_serve.config import EftConfig
from eft_serve.infra.ports import free_port
from eft_serve.infra.tls_proxy import TlsProxy, TlsProxySpec, find_nginx_binary, nginx_conf
from eft_serve.testing.grpc_coordinator import start_coordinator_server
from eft_serve.testing.tls_certs import ThrowawayPki, make_test_pki
from eft_serve.transport.coordinator_rpc import CoordinatorRpc

from fakes import fake_coordinator


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def backend(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    key = add_key(keys_file, "tls-user")
    coord = fake_coordinator()
    await coord.start()
    server, port = await start_coordinator_server(CoordinatorRpc(coord, Gate(load_key_store(keys_file, None))))
    try:
        yield {"upstream": f"127.0.0.1:{port}", "key": key, "server": server}
    finally:
        await server.stop(grace=None)


def _spec(backend, pki: ThrowawayPki, mtls: bool = False, **kw) -> TlsProxySpec:
    return TlsProxySpec(
        upstream=backend["upstream"],
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        client_ca_file=str(pki.ca_cert) if mtls else None,
        **kw,
    )


@pytest.fixture
def tls_front(backend, pki):
    with TlsProxy(_spec(backend, pki)) as proxy:
        yield proxy


@pytest.fixture
def mtls_front(backend, pki):
    with TlsProxy(_spec(backend, pki, mtls=True)) as proxy:
        yield proxy


async def _generate(client: AsyncEftClient) -> list:
    return [m async for m in client.generate("hello", temperature=0, max_new_tokens=4, ignore_eos=True)]


def _assert_status(err: grpc.aio.AioRpcError, code: grpc.StatusCode, *words: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    details = err.details() or ""
    assert "Traceback" not in details and all(w in details for w in words), details


async def test_generate_streams_through_tls_with_an_api_key(backend, pki, tls_front) -> None:
    async with AsyncEftClient(tls_front.address, timeout=20, api_key=backend["key"], ca_cert=str(pki.ca_cert)) as c:
        msgs = await _generate(c)
        assert len(msgs) >= 2 and msgs[-1].usage.completion_tokens == 4
        assert await c.health() == 1
    # The key travels through nginx as metadata: without it the coordinator refuses, as without TLS.
    async with AsyncEftClient(tls_front.address, timeout=20, ca_cert=str(pki.ca_cert)) as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(c)
        _assert_status(err.value, grpc.StatusCode.UNAUTHENTICATED, "authorization: Bearer")

    # The blocking client (in a thread: the server shares this event loop), PEM bytes instead of a path.
    def blocking() -> int:
        with EftClient(tls_front.address, timeout=20, api_key=backend["key"], ca_cert=pki.ca_cert.read_bytes()) as c:
            return c.complete("hello", temperature=0, max_new_tokens=3, ignore_eos=True).usage.completion_tokens

    assert await asyncio.to_thread(blocking) == 3


async def test_plaintext_and_untrusted_clients_fail_with_unavailable(backend, pki, tls_front) -> None:
    for kwargs in ({}, {"ca_cert": str(pki.other_ca_cert)}, {"tls": True}):  # plaintext, wrong CA, system CAs
        async with AsyncEftClient(tls_front.address, timeout=10, api_key=backend["key"], **kwargs) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _generate(c)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (kwargs, err.value.details())


async def test_mtls_refuses_clients_without_a_certificate_of_its_ca(backend, pki, mtls_front) -> None:
    good = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    async with AsyncEftClient(
        mtls_front.address, timeout=20, api_key=backend["key"], ca_cert=str(pki.ca_cert), **good
    ) as c:
        assert (await _generate(c))[-1].usage.completion_tokens == 4
    foreign = {"client_cert": str(pki.other_client_cert), "client_key": str(pki.other_client_key)}
    for kwargs in ({}, foreign):
        async with AsyncEftClient(
            mtls_front.address, timeout=10, api_key=backend["key"], ca_cert=str(pki.ca_cert), **kwargs
        ) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _generate(c)
            _assert_status(err.value, grpc.StatusCode.UNAUTHENTICATED, "client certificate", "--client-cert")


async def test_upstream_down_is_unavailable_and_oversized_requests_are_resource_exhausted(backend, pki) -> None:
    dead = TlsProxySpec(
        upstream=f"127.0.0.1:{free_port()}", cert_file=str(pki.server_cert), key_file=str(pki.server_key)
    )
    with TlsProxy(dead) as proxy:
        async with AsyncEftClient(proxy.address, timeout=10, ca_cert=str(pki.ca_cert)) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _generate(c)
            _assert_status(err.value, grpc.StatusCode.UNAVAILABLE, "not answering")
    with TlsProxy(_spec(backend, pki, max_body_bytes=16 * 1024)) as proxy:
        async with AsyncEftClient(proxy.address, timeout=10, api_key=backend["key"], ca_cert=str(pki.ca_cert)) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.complete("a" * 64 * 1024, max_new_tokens=1)
            _assert_status(err.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "16384 bytes")


def test_nginx_runs_unprivileged_in_its_own_directory_and_stops_by_pid(backend, pki) -> None:
    proxy = TlsProxy(_spec(backend, pki, read_timeout_s=42.4)).start()
    try:
        conf = proxy.conf_path.read_text()
        run_dir = str(proxy.conf_path.parent)
        assert f"listen 127.0.0.1:{proxy.port} ssl http2;" in conf
        assert f"pid {run_dir}/nginx.pid;" in conf and f"client_body_temp_path {run_dir}/tmp/body;" in conf
        assert "grpc_read_timeout 42s;" in conf and "client_max_body_size 4194304;" in conf
        assert "ssl_verify_client" not in conf
        master = proxy.pid
        assert master is not None and (proxy.conf_path.parent / "nginx.pid").read_text().strip() == str(master)
        # A worker drops privileges right after the fork: give it a moment.
        deadline = time.monotonic() + 5
        while True:
            workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == master]
            if (workers and all(_uid(w) != 0 for w in workers)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert workers, "nginx master without workers"
        assert all(_uid(w) == os.geteuid() if os.geteuid() else _uid(w) != 0 for w in workers), "worker runs as root"
    finally:
        proxy.stop()
    assert not proxy.running and not os.path.exists(run_dir)
    assert all(_gone(p) for p in [master, *workers])


def test_nginx_conf_with_mtls_verifies_clients() -> None:
    spec = TlsProxySpec(
        upstream="127.0.0.1:9000", cert_file="/c.pem", key_file="/k.pem", client_ca_file="/ca.pem", port=9443
    )
    conf = nginx_conf(spec, 9443, "/run/x", "nobody nogroup")
    assert "ssl_client_certificate /ca.pem;" in conf and "ssl_verify_client on;" in conf
    assert "error_page 495 496 = /eft-no-client-cert;" in conf and "grpc_pass grpc://127.0.0.1:9000;" in conf
    assert conf.splitlines()[1] == "user nobody nogroup;"
    assert "user " not in nginx_conf(spec, 9443, "/run/x", None)
    assert os.access(find_nginx_binary(), os.X_OK)


def _status_field(pid: int, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split()[1]
    raise KeyError(field)


def _ppid(pid: int) -> int:
    try:
        return int(_status_field(pid, "PPid"))
    except (OSError, KeyError):
        return -1


def _uid(pid: int) -> int:
    return int(_status_field(pid, "Uid"))


def _gone(pid: int) -> bool:
    try:
        return _status_field(pid, "State") == "Z"  # exited, not yet reaped by its parent
    except OSError:
        return True


async def test_tls_front_of_a_config_serves_its_grpc_port(backend, pki) -> None:
    # What `eft serve` runs when tls.enabled: the front of the config's gRPC port, on a free port.
    from eft_serve.config import demo_config
    from eft_serve.infra.tls_proxy import tls_front

    data = demo_config().model_dump()
    data["grpc"]["port"] = int(backend["upstream"].rsplit(":", 1)[1])
    data["coordinator"]["default_timeout_s"] = 33.0
    data["tls"].update(enabled=True, port=0, cert_file=str(pki.server_cert), key_file=str(pki.server_key))
    data["tls"]["client_ca_file"] = str(pki.ca_cert)
    cfg = EftConfig.model_validate(data)
    logs: list[str] = []
    with tls_front(cfg, logs.append) as effective:
        assert effective.tls.port > 0 and "mTLS front" in logs[0]
        cert = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
        address = f"127.0.0.1:{effective.tls.port}"
        async with AsyncEftClient(address, timeout=20, api_key=backend["key"], ca_cert=str(pki.ca_cert), **cert) as c:
            assert (await _generate(c))[-1].usage.completion_tokens == 4
    with pytest.raises(ValueError, match="tls.cert_file"):
        data["tls"]["cert_file"] = None
        EftConfig.model_validate(data)
