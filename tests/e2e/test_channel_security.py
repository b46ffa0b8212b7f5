"""TLS from the SDK side: `credentials=` / `tls_credentials(...)` on both clients and the
CLI's --ca-cert / --cert / --key, against an in-process gRPC server that serves only the
health service over TLS (certificates made with the openssl CLI at test time)."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from normserve.client import AsyncClient, Client, tls_credentials

pytestmark = pytest.mark.e2e

OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> pathlib.Path:
    if OPENSSL is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=normserve-test-ca", cwd=d)
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-copy_extensions", "copy", cwd=d)
    return d


def _health_handler() -> grpc.GenericRpcHandler:
    def check(request: bytes, context) -> bytes:
        return b"\x08\x01"  # HealthCheckResponse{status: SERVING}

    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )


@pytest.fixture(params=["tls", "mtls"])
def tls_server(request, pki):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((_health_handler(),))
    creds = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes() if request.param == "mtls" else None,
        require_client_auth=request.param == "mtls",
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield f"localhost:{port}", request.param == "mtls"
    finally:
        server.stop(None)


def test_tls_with_both_clients_and_the_cli(tls_server, pki):
    target, mutual = tls_server
    good = tls_credentials(pki / "ca.pem", pki / "client.pem", pki / "client.key") if mutual else tls_credentials(str(pki / "ca.pem"))
    with Client(target, credentials=good, timeout=10) as c:
        assert c.health() == "SERVING" and c.ready()
    with Client(target, timeout=5, retry=None) as plain:  # plaintext to a TLS port: not ready
        assert plain.ready() is False
    if mutual:  # the server requires a client certificate
        with Client(target, credentials=tls_credentials(pki / "ca.pem"), timeout=5, retry=None) as anonymous:
            assert anonymous.ready() is False

    async def main():
        async with AsyncClient(target, credentials=good, timeout=10) as a:
            return await a.health()

    assert asyncio.run(main()) == "SERVING"

    flags = ["--ca-cert", str(pki / "ca.pem")]
    if mutual:
        flags += ["--cert", str(pki / "client.pem"), "--key", str(pki / "client.key")]
    done = subprocess.run([sys.executable, "-m", "normserve", "health", "--target", target, *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"{target}: SERVING", done.stderr
