"""Schema-level checks of docker/: the compose files, Prometheus and Grafana config.

They keep the deployment files consistent with each other and with the server without Docker:
every path a file names exists, every named volume is declared, every datasource uid a panel
uses is provisioned, every panel has a query, and every ENGRAM_SERVE_* variable is a real
`engram-serve` option. The image itself is checked in tests/docker (its recipe against
pyproject.toml in `make test`; built and run in `make test-docker`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.cli import build_parser, env_name

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "engram-serve.json"
PROVISIONING = DOCKER / "grafana" / "provisioning"


def interpolate(text: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR}` with an empty environment (what a fresh checkout sees)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text)


def load_compose(name: str) -> dict:
    return yaml.safe_load(interpolate((DOCKER / name).read_text()))


def mounts(service: dict) -> dict[str, str]:
    """{container path: source} of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def ports(service: dict) -> set[str]:
    return {p.split(":")[-1] for p in service.get("ports", [])}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose("compose.yaml")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_compose_services_ports_and_builds(compose):
    services = compose["services"]
    assert set(services) == {"engram-serve", "prometheus", "grafana"}
    assert ports(services["engram-serve"]) == {"8000"}
    assert ports(services["prometheus"]) == {"9090"}
    assert ports(services["grafana"]) == {"3000"}
    build = services["engram-serve"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    for name in ("prometheus", "grafana"):
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", services[name]["image"]), "pin the image version"
    assert services["prometheus"]["depends_on"] == ["engram-serve"]
    assert services["grafana"]["depends_on"] == ["prometheus"]


def test_compose_volumes_declared_and_bind_sources_exist(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            assert target.startswith("/"), f"{name}: {target}"
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind source {source} missing"
            else:
                used.add(source)
    assert used == declared, f"named volumes used {used} != declared {declared}"


def test_table_folder_is_a_volume_at_the_server_cache(compose):
    service = compose["services"]["engram-serve"]
    env = service["environment"]
    assert mounts(service)["/data"] == "engram-tables"  # ENGRAM_TABLES unset -> the named volume
    assert env["ENGRAM_SERVE_CACHE"] == "/data" and env["ENGRAM_SERVE_HOST"] == "0.0.0.0"
    # the drain after SIGTERM must fit in compose's grace period
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert float(env["ENGRAM_SERVE_SHUTDOWN_TIMEOUT"]) < grace


def test_compose_environment_names_real_server_options(compose):
    parser = build_parser()
    known = {env_name(o) for a in parser._actions for o in a.option_strings if o.startswith("--")}
    known.add("ENGRAM_SERVE_CACHE")
    for name in compose["services"]["engram-serve"]["environment"]:
        assert name in known, f"{name} is not an engram-serve option"
    args = parser.parse_args(["--table-placement", compose["services"]["engram-serve"]["environment"]
                              ["ENGRAM_SERVE_TABLE_PLACEMENT"]])
    assert args.table_placement == "host"


def test_cuda_override_environment_names_real_server_options():
    parser = build_parser()
    override = load_compose("compose.cuda.yaml")["services"]["engram-serve"]
    args = parser.parse_args(["--device", override["environment"]["ENGRAM_SERVE_DEVICE"]])
    assert args.device == "cuda"
    known = {env_name(o) for a in parser._actions for o in a.option_strings if o.startswith("--")}
    assert {n for n in override["environment"] if n.startswith("ENGRAM_SERVE_")} <= known


def test_prometheus_config_scrapes_the_server_every_5s(compose):
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"] and port in ports(compose["services"][host])
    assert mounts(compose["services"]["prometheus"])["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    if shutil.which("promtool"):
        subprocess.run(["promtool", "check", "config", str(DOCKER / "prometheus.yml")], check=True,
                       capture_output=True)


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose):
    grafana = mounts(compose["services"]["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host in compose["services"] and port in ports(compose["services"][host])
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "engram-serve.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    mounted = {target: source for target, source in grafana.items() if target.startswith(folder + "/")}
    assert {Path(s).name for s in mounted.values()} == {DASHBOARD.name}
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in mounted


def panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_panels_have_queries_and_provisioned_datasources(dashboard):
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(graphs) >= 15
    for p in graphs:
        assert p["datasource"]["uid"] == datasource["uid"], p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t.get("datasource", p["datasource"])["uid"] == datasource["uid"], p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_dashboard_layout_has_no_overlaps(dashboard):
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


def test_dashboard_covers_every_figure_the_issue_asks_for(dashboard):
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p.get("targets", []))
    for metric in ["engram_serve_generation_tokens_total", "engram_serve_prompt_tokens_total",
                   "engram_serve_request_success_total", "engram_serve_e2e_request_latency_seconds_bucket",
                   "engram_serve_time_to_first_token_seconds_bucket",
                   "engram_serve_inter_token_latency_seconds_bucket", "engram_serve_num_requests_running",
                   "engram_serve_num_requests_waiting", "engram_serve_kv_cache_usage_perc",
                   "engram_cache_hits_total", "engram_table_lookups_total", "engram_prefetch_wait_seconds_bucket",
                   "engram_serve_step_seconds_bucket", "engram_gather_rows_total", "engram_gather_bytes_total",
                   "engram_table_rows_touched_ratio", "engram_table_bytes", "engram_gate_mean"]:
        assert re.search(rf"\b{metric}\b", exprs), f"no panel queries {metric}"
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, layer) (rate(engram_prefetch_wait_seconds_bucket" \
            in exprs

