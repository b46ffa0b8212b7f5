"""Structured request logs and the drift/queue/batch-size metrics, on a real server."""

from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import pytest
import torch
from serverproc import ServerProcess

from normserve.client import Client
from normserve.client.errors import NotFoundError


@pytest.fixture(scope="module")
def debug_server():
    with ServerProcess("--log-level", "DEBUG", "--log-format", "json") as server:
        yield server


def _metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    raise AssertionError(f"{name}{{{want}}} not exposed")


def test_json_logs_have_one_line_per_request_with_its_id(debug_server):
    with Client(debug_server.target, timeout=10) as c:
        c.create_layer("logged", "BatchNorm1d", num_features=2)
        result = c.normalize_result("logged", np.ones((4, 2), np.float32), mode="train", request_id="req-0001")
        with pytest.raises(NotFoundError):
            c.get_layer("absent")
    assert result.request_id == "req-0001"
    assert debug_server.wait_for_log("GetLayer layer=absent")
    entries = [json.loads(line) for line in debug_server.lines if line.startswith("{")]
    assert len(entries) == len([l for l in debug_server.lines if l.strip()]), "every log line is JSON"
    requests = [e for e in entries if e["logger"] == "normserve.requests"]
    train = [e for e in requests if e.get("request_id") == "req-0001"]
    assert len(train) == 1
    assert train[0]["method"] == "Normalize" and train[0]["mode"] == "train" and train[0]["code"] == "OK"
    assert train[0]["layer"] == "logged" and train[0]["duration_seconds"] > 0
    missing = [e for e in requests if e["method"] == "GetLayer" and e["layer"] == "absent"]
    assert missing and missing[0]["code"] == "NOT_FOUND"


def test_drift_histogram_follows_the_running_statistics(debug_server):
    """Each train batch observes how far its mean lies from the running mean before the
    update, in running standard deviations — computed here with a local module."""
    url = debug_server.metrics_url
    local = torch.nn.BatchNorm1d(3, momentum=0.5)
    rng = np.random.default_rng(3)
    expected = []
    with Client(debug_server.target, timeout=10) as c:
        c.create_layer("drifty", "BatchNorm1d", num_features=3, momentum=0.5)
        for shift in (0.0, 4.0, 4.0, -3.0):
            x = (rng.standard_normal((32, 3)) + shift).astype(np.float32)
            before_mean = local.running_mean.double().clone()
            before_var = local.running_var.double().clone()
            local.train()
            local(torch.from_numpy(x))
            batch_mean = torch.from_numpy(x).double().mean(0)
            expected.append(float(((batch_mean - before_mean).abs() / (before_var + local.eps).sqrt()).mean()))
            c.normalize("drifty", x, mode="train")
            c.normalize("drifty", x, mode="eval")  # eval observes nothing
    assert _metric(url, "normserve_train_drift_count", layer="drifty") == 4
    assert _metric(url, "normserve_train_drift_sum", layer="drifty") == pytest.approx(sum(expected), rel=1e-4)
    assert _metric(url, "normserve_queue_duration_seconds_count", kind="BatchNorm1d", mode="train") >= 4
    assert _metric(url, "normserve_batch_size_sum", mode="train") >= 4 * 32
