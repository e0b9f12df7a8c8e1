"""deploy/ and docker-compose.yml: valid as their tools read them, and consistent.

``docker-compose config`` (Debian's docker-compose) validates the compose file; the files it
mounts exist; every worker and the reaper have a healthcheck on the endpoints they serve;
Prometheus scrapes both workers and the reaper; the dashboard's panels all have queries.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


def compose_config() -> dict:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose not found: scripts/setup.sh installs Debian's package")
    done = subprocess.run(
        [tool, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_docker_compose_config_validates_the_stack():
    config = compose_config()
    services = config["services"]
    assert {"redis", "rabbitmq", "worker-1", "worker-2", "reaper", "prometheus", "grafana"} <= set(
        services
    )
    for name, endpoint in (
        ("worker-1", ":9808/readyz"),
        ("worker-2", ":9808/readyz"),
        ("reaper", ":9809/readyz"),
    ):
        assert endpoint in " ".join(services[name]["healthcheck"]["test"]), name
    assert "--metrics-port" in services["reaper"]["command"]
    assert services["worker-1"]["environment"]["CELERY_RELIABLE_METRICS_PORT"] == "9808"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(("/", ".")):
                assert (ROOT / source).resolve().exists() or source.startswith("/"), source
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{port}: published beyond loopback"


def test_prometheus_config_scrapes_both_workers_and_the_reaper_with_the_rules():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {"worker-1:9808", "worker-2:9808", "reaper:9809"}
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_dashboard_panels_all_have_prometheus_queries():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "celery-reliable.json").read_text())
    assert dashboard["uid"] == "celery-reliable"
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "celery_reliable_" in target["expr"], (panel["title"], target["expr"])
