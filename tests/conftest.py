"""Shared fixtures: one real server process per test session, clients, unique names.

The `client` fixture is the sync `Client`. Test modules listed in BOTH_CLIENTS, and tests
marked `both_clients`, run twice: once with the sync Client and once with the AsyncClient
driven through a synchronous adapter (tests/asyncadapter.py), so the same suites check
both twins.
"""

from __future__ import annotations

import itertools
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from asyncadapter import SyncAsyncClient  # noqa: E402
from redisproc import start_or_skip  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

from normserve.client import Client  # noqa: E402

_names = itertools.count()

# Suites that run against both the sync and the async client, unchanged.
BOTH_CLIENTS = {"test_parity.py", "test_errors.py"}
CLIENT_KINDS = ("sync", "async")


def pytest_configure(config):
    config.addinivalue_line("markers", "both_clients: run the test with the sync and the async client")


def pytest_generate_tests(metafunc):
    if "client_kind" not in metafunc.fixturenames:
        return
    module = os.path.basename(getattr(metafunc.module, "__file__", "") or "")
    if module in BOTH_CLIENTS or metafunc.definition.get_closest_marker("both_clients"):
        metafunc.parametrize("client_kind", CLIENT_KINDS, indirect=True)


@pytest.fixture
def client_kind(request):
    """"sync" or "async" (see BOTH_CLIENTS); "sync" where the test isn't parametrized."""
    return getattr(request, "param", "sync")


def make_client(kind: str, target: str, **kwargs):
    """A sync Client, or an AsyncClient behind the synchronous adapter."""
    return Client(target, **kwargs) if kind == "sync" else SyncAsyncClient(target, **kwargs)


@pytest.fixture(scope="session")
def server():
    """A real `normserve serve` process on 127.0.0.1 (port 0) for the whole session."""
    with ServerProcess() as proc:
        yield proc


@pytest.fixture(scope="session")
def redis():
    """A real redis-server on 127.0.0.1 for the shared-store tests (skips without one,
    fails instead under CI: NORMSERVE_REQUIRE_REDIS=1)."""
    proc = start_or_skip()
    yield proc
    proc.cleanup()


@pytest.fixture
def client(server, client_kind):
    with make_client(client_kind, server.target, timeout=30) as c:
        yield c


@pytest.fixture
def name(request):
    """A layer name unique within the session (tests share one server)."""
    return re.sub(r"[^A-Za-z0-9._:/-]", "-", f"t{next(_names)}-{request.node.name}")[:128]
