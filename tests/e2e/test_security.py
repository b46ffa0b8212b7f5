"""TLS, mutual TLS, bearer tokens and roles, over real server processes. Certificates are
generated at test time with the openssl CLI."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from serverproc import ServerProcess

from normserve.client import Client
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc
from normserve.server.transport.auth import digest

OPENSSL = shutil.which("openssl")
UNAUTH, DENIED, OK = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: pathlib.Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "1", "-subj", f"/CN={name}", cwd=d)


def _leaf(d: pathlib.Path, name: str, ca: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca")
    _leaf(d, "client", "ca")
    _leaf(d, "stranger", "other-ca")
    return d


def _read(d: pathlib.Path, name: str) -> bytes:
    return (d / name).read_bytes()


def _tls_creds(pki: pathlib.Path, client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(_read(pki, "ca.pem"))
    return grpc.ssl_channel_credentials(_read(pki, "ca.pem"), _read(pki, f"{client}.key"), _read(pki, f"{client}.pem"))


def test_tls_serves_and_plaintext_fails(pki):
    with ServerProcess("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")) as server:
        assert "(TLS, no authentication)" in server.log()
        with Client(server.target, credentials=_tls_creds(pki), timeout=10) as c:
            c.create_layer("tls", "BatchNorm1d", num_features=2)
            out = c.normalize("tls", np.ones((3, 2), np.float32), mode="train")
            assert out.shape == (3, 2)
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.NormServiceStub(channel).ListLayers(pb.ListLayersRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(pki):
    args = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
            "--tls-client-ca", str(pki / "ca.pem"))
    with ServerProcess(*args) as server:
        assert "(mutual TLS" in server.log()
        with Client(server.target, credentials=_tls_creds(pki, "client"), timeout=10) as c:
            assert c.list_layers() == []
        for creds in (_tls_creds(pki), _tls_creds(pki, "stranger")):  # no cert; cert from another CA
            with grpc.secure_channel(server.target, creds) as channel:
                with pytest.raises(grpc.RpcError) as e:
                    pb_grpc.NormServiceStub(channel).ListLayers(pb.ListLayersRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# -- tokens and roles --------------------------------------------------------------------
TOKENS = {"infer": "tok-infer-1", "train": "tok-train-1", "admin": "tok-admin-1", "tenant": "tok-tenant-1"}


def _tokens_file(path: pathlib.Path, tokens: dict[str, str]) -> pathlib.Path:
    entries = []
    for who, token in tokens.items():
        role = "train" if who == "tenant" else who
        entry = {"name": who, "sha256": digest(token), "role": role}
        if who == "tenant":
            entry["layer_prefix"] = "team-a/"
        entries.append(entry)
    path.write_text(json.dumps({"tokens": entries}))
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    path = _tokens_file(tmp_path_factory.mktemp("tokens") / "tokens.json", TOKENS)
    with ServerProcess("--tokens-file", str(path)) as server:
        admin = [("authorization", f"Bearer {TOKENS['admin']}")]
        with Client(server.target, metadata=admin, timeout=10) as c:
            for layer in ("shared/bn", "team-a/bn"):
                c.create_layer(layer, "BatchNorm1d", num_features=2)
                c.normalize(layer, np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32), mode="train")
        yield server, path


def _tensor() -> pb.Tensor:
    x = np.ones((4, 2), np.float32)
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes())


CALLS = {
    # rpc name -> (method, request factory, role needed); layer "L" is filled in per call
    "GetLayer": ("GetLayer", lambda L: pb.GetLayerRequest(name=L), "infer"),
    "ListLayers": ("ListLayers", lambda L: pb.ListLayersRequest(), "infer"),
    "GetState": ("GetState", lambda L: pb.GetStateRequest(name=L), "infer"),
    "Normalize-eval": ("Normalize", lambda L: pb.NormalizeRequest(layer=L, mode=pb.MODE_EVAL, input=_tensor()), "infer"),
    "Normalize-train": ("Normalize", lambda L: pb.NormalizeRequest(layer=L, mode=pb.MODE_TRAIN, input=_tensor()), "train"),
    "ResetRunningStats": ("ResetRunningStats", lambda L: pb.ResetRunningStatsRequest(name=L, expected_version=10**9), "admin"),
    "LoadState": ("LoadState", lambda L: pb.LoadStateRequest(name=L, expected_version=10**9), "admin"),
    "CreateLayer": ("CreateLayer", lambda L: pb.CreateLayerRequest(name=L), "admin"),
    "DeleteLayer": ("DeleteLayer", lambda L: pb.DeleteLayerRequest(name=L + "-absent"), "admin"),
    "RegisterSharedMemory": (
        "RegisterSharedMemory",
        lambda L: pb.RegisterSharedMemoryRequest(name="r", key="normserve-absent-segment", byte_size=64),
        "infer",
    ),
    "UnregisterSharedMemory": ("UnregisterSharedMemory", lambda L: pb.UnregisterSharedMemoryRequest(name="absent"), "infer"),
    "ListSharedMemory": ("ListSharedMemory", lambda L: pb.ListSharedMemoryRequest(), "infer"),
}
RANK = {"none": -1, "wrong": -1, "infer": 0, "train": 1, "admin": 2}


def _call(target: str, rpc: str, who: str, layer: str) -> grpc.StatusCode:
    method, make, _ = CALLS[rpc]
    metadata = []
    if who == "wrong":
        metadata = [("authorization", "Bearer not-a-token")]
    elif who != "none":
        metadata = [("authorization", f"Bearer {TOKENS[who]}")]
    with grpc.insecure_channel(target) as channel:
        try:
            getattr(pb_grpc.NormServiceStub(channel), method)(make(layer), metadata=metadata, timeout=10)
            return OK
        except grpc.RpcError as e:
            return e.code()


@pytest.mark.parametrize("who", ["none", "wrong", "infer", "train", "admin"])
@pytest.mark.parametrize("rpc", sorted(CALLS))
def test_role_matrix(auth_server, rpc, who):
    """Every RPC x every role: UNAUTHENTICATED without a valid token, PERMISSION_DENIED
    below the needed role, otherwise the call gets past auth (the requests that pass are
    built to fail harmlessly after auth: a stale expected_version, an empty spec)."""
    server, _ = auth_server
    code = _call(server.target, rpc, who, "shared/bn")
    needed = CALLS[rpc][2]
    if who in ("none", "wrong"):
        assert code == UNAUTH
    elif RANK[who] < RANK[needed]:
        assert code == DENIED
    else:
        assert code not in (UNAUTH, DENIED)


def test_denied_train_request_leaves_state_unchanged(auth_server):
    server, _ = auth_server
    admin = [("authorization", f"Bearer {TOKENS['admin']}")]
    with Client(server.target, metadata=admin, timeout=10) as c:
        before, version = c.get_state("shared/bn"), c.get_layer("shared/bn").state
        assert _call(server.target, "Normalize-train", "infer", "shared/bn") == DENIED
        after = c.get_state("shared/bn")
        assert c.get_layer("shared/bn").state == version
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_layer_prefix_confines_a_tenant(auth_server):
    server, _ = auth_server
    tenant = [("authorization", f"Bearer {TOKENS['tenant']}")]
    with Client(server.target, metadata=tenant, timeout=10) as c:
        assert [l.name for l in c.list_layers()] == ["team-a/bn"]
        c.normalize("team-a/bn", np.ones((4, 2), np.float32), mode="train")
    assert _call(server.target, "Normalize-train", "tenant", "shared/bn") == DENIED
    assert _call(server.target, "GetLayer", "tenant", "shared/bn") == DENIED


def test_stream_checks_each_message(auth_server):
    server, _ = auth_server
    infer = [("authorization", f"Bearer {TOKENS['infer']}")]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        requests = [pb.NormalizeRequest(layer="shared/bn", mode=m, input=_tensor()) for m in (pb.MODE_EVAL, pb.MODE_TRAIN, pb.MODE_EVAL)]
        responses = list(stub.NormalizeStream(iter(requests), metadata=infer, timeout=10))
        assert [r.WhichOneof("result") for r in responses] == ["response", "error", "response"]
        assert responses[1].error.code == DENIED.value[0]
        with pytest.raises(grpc.RpcError) as e:
            list(stub.NormalizeStream(iter(requests), timeout=10))
        assert e.value.code() == UNAUTH


def test_health_stays_open_without_a_token(auth_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, _ = auth_server
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_sighup_reloads_tokens_and_a_malformed_file_keeps_the_old_ones(tmp_path):
    path = _tokens_file(tmp_path / "tokens.json", {"admin": "first-admin"})
    with ServerProcess("--tokens-file", str(path)) as server:
        assert _status(server, "first-admin") == OK
        _tokens_file(path, {"admin": "second-admin"})
        server.signal(signal.SIGHUP)
        assert server.wait_for_log("tokens file reloaded: 1 token")
        assert _status(server, "second-admin") == OK and _status(server, "first-admin") == UNAUTH
        path.write_text('{"tokens": [{"name": "x", "sha256": "nothex", "role": "admin"}]}')
        server.signal(signal.SIGHUP)
        assert server.wait_for_log("tokens file not reloaded, keeping the 1 current token")
        assert "sha256" in server.log().rsplit("not reloaded", 1)[1]
        assert _status(server, "second-admin") == OK


def _status(server: ServerProcess, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(server.target) as channel:
        try:
            pb_grpc.NormServiceStub(channel).ListLayers(
                pb.ListLayersRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10
            )
            return OK
        except grpc.RpcError as e:
            return e.code()


def test_token_new_prints_a_token_and_its_entry(tmp_path):
    cli = pathlib.Path(sys.executable).with_name("normserve")
    out = subprocess.run([str(cli), "token", "new", "--role", "train", "--layer-prefix", "team-a/"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    token = out.split("token: ", 1)[1].split()[0]
    entry = json.loads(out.strip().splitlines()[-1])
    assert entry["sha256"] == digest(token) and entry["role"] == "train" and entry["layer_prefix"] == "team-a/"
    assert token not in out.strip().splitlines()[-1]  # the file holds only the digest
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [entry]}))
    with ServerProcess("--tokens-file", str(path)) as server:
        with Client(server.target, metadata=[("authorization", f"Bearer {token}")], timeout=10) as c:
            assert c.list_layers() == []


def test_a_malformed_tokens_file_stops_start_up_with_a_message(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text('{"tokens": [{"name": "x", "sha256": "' + "a" * 64 + '", "role": "root"}]}')
    proc = subprocess.run(
        [sys.executable, "-m", "normserve", "serve", "--port", "0", "--metrics-port", "-1",
         "--state-dir", ":memory:", "--tokens-file", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "'role' must be one of infer, train, admin" in proc.stderr
