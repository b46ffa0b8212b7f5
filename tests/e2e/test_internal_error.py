"""An unexpected exception becomes INTERNAL with a request id; the traceback stays in the
server log. Fault injected into an in-process server (real gRPC channel on 127.0.0.1)."""

import logging
import re

import grpc
import numpy as np
import pytest

from normserve.client import Client
from normserve.client.errors import InternalError
from normserve.server.app import NormServer
from normserve.server.settings import Settings


@pytest.fixture
def server():
    srv = NormServer(Settings(port=0, metrics_port=-1, torch_threads=0, state_dir=":memory:"))
    srv.start()
    yield srv
    srv.stop(grace=1)


def test_unexpected_exception_is_internal_with_request_id(server, monkeypatch, caplog):
    def broken_get(name):
        raise RuntimeError("secret internal detail")

    with Client(f"127.0.0.1:{server.port}", timeout=10) as c:
        c.create_layer("bn", "BatchNorm1d", num_features=2)
        before = c.get_state("bn")
        monkeypatch.setattr(server.layers, "get", broken_get)
        with caplog.at_level(logging.ERROR, logger="normserve.transport"):
            with pytest.raises(InternalError) as info:
                c.normalize("bn", np.ones((4, 2), np.float32), mode="train")
        monkeypatch.undo()
        err = info.value
        assert err.code == grpc.StatusCode.INTERNAL
        assert "secret" not in err.message and "Traceback" not in err.message
        request_id = re.search(r"request id ([0-9a-f]{16})", err.message).group(1)
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert logged and logged[0].exc_info and "secret internal detail" in str(logged[0].exc_info[1])
        after = c.get_state("bn")
        assert all(np.array_equal(before[k], after[k]) for k in before)
