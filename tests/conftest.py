"""Shared fixtures: one real server process per test session, clients, unique names."""

from __future__ import annotations

import itertools
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from serverproc import ServerProcess  # noqa: E402

from normserve.client import Client  # noqa: E402

_names = itertools.count()


@pytest.fixture(scope="session")
def server():
    """A real `normserve serve` process on 127.0.0.1 (port 0) for the whole session."""
    with ServerProcess() as proc:
        yield proc


@pytest.fixture
def client(server):
    with Client(server.target, timeout=30) as c:
        yield c


@pytest.fixture
def name(request):
    """A layer name unique within the session (tests share one server)."""
    return re.sub(r"[^A-Za-z0-9._:/-]", "-", f"t{next(_names)}-{request.node.name}")[:128]
