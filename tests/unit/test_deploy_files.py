"""docker-compose.yml, the Dockerfile and deploy/ agree with the server's defaults.
(No container engine runs here: the files are parsed, not run.)"""

import json
import pathlib
import re

import yaml

from normserve.server.app import SERVICE_NAME
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


# -- scale-out: Kubernetes manifests and the compose "replicas" profile -----------------------
SETTING_ENV = {Settings.env_name(f) for f in Settings.__dataclass_fields__}


def _k8s() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / resource).read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _store_host_port(url: str) -> tuple[str, int]:
    m = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", url)
    assert m, url
    return m.group(1), int(m.group(2))


def test_k8s_deployment_runs_replicas_with_grpc_probes_on_the_server_defaults():
    docs = _k8s()
    deployment = docs[("Deployment", "normserve")]
    assert deployment["spec"]["replicas"] >= 3
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": DEFAULTS.port, "metrics": DEFAULTS.metrics_port}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= SETTING_ENV, set(env) - SETTING_ENV
    assert env["NORMSERVE_PORT"] == str(DEFAULTS.port) and env["NORMSERVE_HOST"] == "0.0.0.0"
    Settings.load(environ=env)  # every value is valid
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == DEFAULTS.port, probe  # the standard health service
    # Readiness follows the store (the service's own health), liveness only the process.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(DEFAULTS.metrics_port)
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert container["securityContext"]["runAsUser"] == int(uid)
    drain = float(env["NORMSERVE_DRAIN_SECONDS"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + DEFAULTS.grace_seconds


def test_k8s_services_select_the_pods_and_the_store_is_a_dependency():
    docs = _k8s()
    pod = docs[("Deployment", "normserve")]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    headless = docs[("Service", "normserve-headless")]["spec"]
    assert headless["clusterIP"] == "None"  # DNS lists every ready replica: client-side round_robin
    for name in ("normserve", "normserve-headless"):
        spec = docs[("Service", name)]["spec"]
        assert spec["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in spec["ports"]} <= port_names
    env = {e["name"]: e["value"] for e in container["env"]}
    host, port = _store_host_port(env["NORMSERVE_STORE"])
    store_service = docs[("Service", host)]["spec"]
    assert port in [p["port"] for p in store_service["ports"]]
    redis = docs[("StatefulSet", host)]["spec"]
    assert store_service["selector"].items() <= redis["template"]["metadata"]["labels"].items()
    (redis_container,) = redis["template"]["spec"]["containers"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", redis_container["image"])
    assert ["--appendonly", "yes"] == redis_container["args"][:2]  # acknowledged = logged
    (init,) = pod["spec"]["initContainers"]
    assert host in " ".join(init["command"])


def test_compose_replicas_profile_shares_one_redis():
    services = _compose()["services"]
    replicas = {n: s for n, s in services.items() if "replicas" in s.get("profiles", ()) and n != "redis"}
    assert len(replicas) == 3
    assert "replicas" in services["redis"]["profiles"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", services["redis"]["image"])
    published = [p.split(":")[0] for s in replicas.values() for p in s["ports"]]
    assert len(published) == len(set(published))
    for name, svc in replicas.items():
        env = svc["environment"]
        assert set(env) <= SETTING_ENV
        Settings.load(environ=env)
        assert _store_host_port(env["NORMSERVE_STORE"]) == ("redis", 6379)
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert {p.split(":")[1] for p in svc["ports"]} == {str(DEFAULTS.port), str(DEFAULTS.metrics_port)}
