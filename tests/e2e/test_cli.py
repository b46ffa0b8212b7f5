"""The operator CLI, run as real commands (`python -m normserve ...`) against a real server:
`normserve layers list|get|create|delete|reset|state` and `normserve health`, tables by
default and --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "normserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ok(*args: str, **kwargs) -> str:
    done = cli(*args, **kwargs)
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    return done.stdout


def test_layers_lifecycle_tables(server, client, name):
    t = ("--target", server.target)
    out = ok("layers", "create", name, "BatchNorm2d", "num_features=3", "momentum=null", "--arg", "eps=0.001", *t)
    assert out.startswith(f"created {name}: BatchNorm2d") and "momentum=None" in out and "eps=0.001" in out

    client.normalize(name, np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32), "train")

    out = ok("layers", "list", "--prefix", name, *t)
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "KIND", "VERSION", "BATCHES", "RUNNING_STATS", "ARGS"]
    assert row.split()[:5] == [name, "BatchNorm2d", "1", "1", "yes"]
    assert "num_features=3" in row

    rows = [line.split(None, 1) for line in ok("layers", "get", name, *t).strip().splitlines()]
    fields = {row[0]: (row[1] if len(row) > 1 else "") for row in rows}
    assert rows[0] == ["FIELD", "VALUE"]
    assert fields["name"] == name and fields["kind"] == "BatchNorm2d" and fields["version"] == "1"
    assert fields["num_batches_tracked"] == "1" and fields["momentum"] == "None" and fields["eps"] == "0.001"

    out = ok("layers", "state", name, *t)
    lines = out.strip().splitlines()
    assert lines[0] == f"{name}: BatchNorm2d version=1 num_batches_tracked=1"
    assert lines[1].split() == ["KEY", "DTYPE", "SHAPE", "MIN", "MEAN", "MAX", "VALUES"]
    keys = [line.split()[0] for line in lines[2:]]
    assert keys == sorted(["bias", "num_batches_tracked", "running_mean", "running_var", "weight"])

    out = ok("layers", "reset", name, "--expected-version", "1", *t)
    assert out.strip() == f"reset {name}: version=2 num_batches_tracked=0"
    assert client.get_layer(name).state.num_batches_tracked == 0

    out = ok("layers", "delete", name, *t)
    assert out.strip() == f"deleted {name}"
    assert ok("layers", "list", "--prefix", name, *t).strip().splitlines()[1:] == []


def test_layers_json(server, client, name):
    t = ("--target", server.target, "--json")
    created = json.loads(ok("layers", "create", name, "LayerNorm", "normalized_shape=[2,3]", "dtype=float64", *t))
    assert created["kind"] == "LayerNorm" and created["args"]["normalized_shape"] == [2, 3]
    assert created["args"]["dtype"] == "float64" and created["version"] == 0

    listed = json.loads(ok("layers", "list", "--prefix", name, *t))
    assert [layer["name"] for layer in listed] == [name]
    assert listed[0] == json.loads(ok("layers", "get", name, *t))

    state = json.loads(ok("layers", "state", name, *t))
    expected = client.get_state(name)
    assert state["version"] == 0 and sorted(state["state"]) == sorted(expected)
    for key, value in expected.items():
        entry = state["state"][key]
        assert entry["dtype"] == "float64" and entry["shape"] == list(value.shape)
        np.testing.assert_array_equal(np.asarray(entry["values"]), value)

    deleted = json.loads(ok("layers", "delete", name, name + "-nope", "--missing-ok", *t))
    assert deleted == {"deleted": [name], "missing": [name + "-nope"]}


def test_layers_errors_are_one_line_and_exit_1(server, name):
    t = ("--target", server.target)
    for args, word in [
        (("layers", "get", name), "NOT_FOUND"),
        (("layers", "delete", name), "NOT_FOUND"),
        (("layers", "create", name, "BatchNorm9d", "num_features=3"), "BatchNorm9d"),
        (("layers", "create", name, "BatchNorm2d", "num_features"), "ARG=VALUE"),
        (("layers", "create", name, "GroupNorm", "num_groups=4", "num_channels=6"), "divisible"),
    ]:
        done = cli(*args, *t)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert word in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    usage = cli("layers", "frobnicate", *t)
    assert usage.returncode == 2


def test_health(server):
    assert ok("health", "--target", server.target).strip() == f"{server.target}: SERVING"
    doc = json.loads(ok("health", "--target", server.target, "--json"))
    assert doc == {"target": server.target, "service": "", "status": "SERVING"}
    assert json.loads(ok("health", "--json", "--service", "normserve.v1.NormService", env={"NORMSERVE_TARGET": server.target}))["status"] == "SERVING"

    down = cli("health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    down = cli("health", "--target", "127.0.0.1:1", "--timeout", "2", "--json")
    assert down.returncode == 1 and json.loads(down.stdout)["error"]["code"] == "UNAVAILABLE"
    unknown = cli("health", "--target", server.target, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
