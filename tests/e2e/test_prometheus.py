"""Against a real Prometheus: the scrape config under deploy/ works, the exposition passes
`promtool check metrics`, and every query of the Grafana dashboard returns data after a
loaded server has been scraped."""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml
from serverproc import ServerProcess

from normserve.client import Client
from normserve.client.errors import NormServeError

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="prometheus/promtool not installed (Debian package `prometheus`; .ci/run installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_queries() -> list[str]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "normserve.json").read_text())
    # Grafana fills $__rate_interval in; 10s spans several 1 s scrapes here.
    return [t["expr"].replace("$__rate_interval", "10s") for p in dash["panels"] for t in p["targets"]]


def _traffic(target: str, stop: threading.Event) -> None:
    """Mixed load: train and eval, unary and streamed, a few errors, several layer kinds."""
    rng = np.random.default_rng(0)
    with Client(target, timeout=10) as c:
        c.create_layer("prom/bn", "BatchNorm2d", num_features=3, momentum=None)
        c.create_layer("prom/ln", "LayerNorm", normalized_shape=[8])
        i = 0
        while not stop.is_set() and i < 5000:
            i += 1
            x = (rng.standard_normal((4, 3, 8, 8)) * (1 + i % 3) + i % 5).astype(np.float32)
            c.normalize("prom/bn", x, mode="train")
            c.normalize("prom/bn", x, mode="eval")
            c.normalize("prom/ln", x, mode="eval")
            if i % 10 == 0:
                list(c.normalize_stream("prom/bn", [x, x], mode="eval"))
                for bad in (lambda: c.get_layer("prom/missing"), lambda: c.normalize("prom/bn", x[:, :2], mode="eval")):
                    with pytest.raises(NormServeError):
                        bad()
            time.sleep(0.01)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A normserve server under load and a Prometheus scraping it every second."""
    tmp = tmp_path_factory.mktemp("prom")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    with ServerProcess("--batching", "on") as server:  # the dashboard's batching queries need data
        metrics_host = urllib.parse.urlsplit(server.metrics_url).netloc
        config["global"]["scrape_interval"] = "1s"
        config["global"]["evaluation_interval"] = "1s"
        for job in config["scrape_configs"]:
            for static in job["static_configs"]:
                static["targets"] = [metrics_host]
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = _free_port()
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        stop = threading.Event()
        load = threading.Thread(target=_traffic, args=(server.target, stop), daemon=True)
        load.start()
        try:
            yield server, f"http://127.0.0.1:{port}", config_path
        finally:
            stop.set()
            load.join(30)
            prom.terminate()
            try:
                prom.wait(15)
            except subprocess.TimeoutExpired:
                prom.kill()


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_promtool_accepts_the_deploy_config_and_the_derived_one(scraped):
    _, _, derived = scraped
    for path in (ROOT / "deploy" / "prometheus.yml", derived):
        out = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_exposition(scraped):
    server, _, _ = scraped
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        text = r.read()
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()


def test_every_dashboard_query_returns_data(scraped):
    _, base, _ = scraped
    queries = _dashboard_queries()
    assert len(queries) >= 10
    empty = queries
    deadline = time.monotonic() + 60
    while empty and time.monotonic() < deadline:
        try:
            empty = [q for q in queries if not _query(base, q)]
        except OSError:  # Prometheus still starting
            pass
        if empty:
            time.sleep(1)
    assert not empty, f"queries without data after 60 s: {empty}"
