"""docker-compose.yml, the Dockerfile and deploy/ agree with the server's defaults.
(No container engine runs here: the files are parsed, not run.)"""

import json
import pathlib
import re

import yaml

from normserve.server.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULTS = Settings()


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_server_prometheus_grafana_with_pinned_images():
    services = _compose()["services"]
    assert {"normserve", "prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name} image not pinned: {image}"


def test_compose_ports_match_server_defaults():
    svc = _compose()["services"]["normserve"]
    published = {p.split(":")[-1] for p in svc["ports"]}
    assert {str(DEFAULTS.port), str(DEFAULTS.metrics_port)} <= published
    env = svc["environment"]
    assert env["NORMSERVE_PORT"] == str(DEFAULTS.port)
    assert env["NORMSERVE_METRICS_PORT"] == str(DEFAULTS.metrics_port)
    assert env["NORMSERVE_HOST"] == "0.0.0.0"  # reachable from the other containers


def test_prometheus_scrapes_the_metrics_port():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"normserve:{DEFAULTS.metrics_port}" in targets


def test_compose_mounts_match_deploy_files():
    services = _compose()["services"]
    for svc in ("prometheus", "grafana"):
        for volume in services[svc]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{svc} mounts missing {source}"


def test_dockerfile_runs_as_non_root_with_grpc_health_check():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "torch==2.13.0" in text
    health = re.search(r"^HEALTHCHECK .*\n?.*CMD (.*)$", text, re.M)
    assert health and "normserve" in health.group(1) and "health" in health.group(1)
    assert f"--target\", \"127.0.0.1:{DEFAULTS.port}" in health.group(1)
    exposed = set(re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split())
    assert exposed == {str(DEFAULTS.port), str(DEFAULTS.metrics_port)}


def test_dashboard_queries_use_existing_metric_names():
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "normserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        assert re.findall(r"normserve_\w+", expr), expr  # every query reads normserve metrics
    # Each panel the monitoring section promises is there.
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("latency", "throughput", "error", "in-flight", "batch size", "drift", "state version"):
        assert word in titles, word


def test_state_dir_is_a_named_volume():
    compose = _compose()
    svc = compose["services"]["normserve"]
    state_dir = svc["environment"]["NORMSERVE_STATE_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts.get(state_dir) in compose["volumes"]
    assert f"NORMSERVE_STATE_DIR={state_dir}" in (ROOT / "Dockerfile").read_text()
