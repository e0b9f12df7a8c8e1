"""deploy/ and docker-compose.yml: valid as their tools read them, and consistent.

``docker-compose config`` (Debian's docker-compose) validates the compose file; the files it
mounts exist; every worker and the reaper have a healthcheck on the endpoints they serve;
Prometheus scrapes both workers and the reaper; the dashboard's panels all have queries.
The smoke run's override (``scripts/compose-smoke.sh``) is checked the same way, without an
engine: host networking only, every address on 127.0.0.1, no published port, no Grafana.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


SMOKE_OVERRIDE = ROOT / "deploy" / "smoke" / "docker-compose.smoke.yml"
SMOKE_SCRIPT = ROOT / "scripts" / "compose-smoke.sh"


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose not found: scripts/setup.sh installs Debian's package")
    args = [tool]
    for file in files or (COMPOSE,):
        args += ["-f", str(file)]
    done = subprocess.run(
        [*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
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


def smoke_services() -> list[str]:
    """The services scripts/compose-smoke.sh starts (its SERVICES array)."""
    match = re.search(r"^SERVICES=\(([^)]*)\)", SMOKE_SCRIPT.read_text(), re.MULTILINE)
    assert match, "SERVICES=(...) not found in scripts/compose-smoke.sh"
    return match.group(1).split()


def test_smoke_override_runs_every_service_on_loopback_of_the_host_network(tmp_path):
    ports = {
        f"SMOKE_{name}_PORT": str(21000 + i)
        for i, name in enumerate(
            [
                "AMQP",
                "REDIS",
                "DIST",
                "MANAGEMENT",
                "EPMD",
                "WORKER1_METRICS",
                "WORKER2_METRICS",
                "REAPER_METRICS",
                "PROMETHEUS",
            ]
        )
    }
    env = {"PATH": "/usr/bin:/bin", **ports, "SMOKE_PROMETHEUS_CONFIG": str(tmp_path / "p.yml")}
    merged = compose_config(COMPOSE, SMOKE_OVERRIDE, env=env)
    spec = importlib.util.spec_from_file_location("render", ROOT / "deploy/smoke/render.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    services = smoke_services()
    # Everything but Grafana, which has no Debian package to build its image from.
    assert set(merged["services"]) - set(services) == {"grafana"}
    config = render.render(merged, services)
    assert set(config["services"]) == set(services)
    # No network is created: the default one is the host's, and every service uses it.
    assert config["networks"] == {"default": {"external": True, "name": "host"}}
    for name, service in config["services"].items():
        assert service["network_mode"] == "host", name
        assert "ports" not in service and "networks" not in service, name
        if "build" in service:
            assert service["build"]["network"] == "host", name
    # Every address a service is given, or listens on, is 127.0.0.1 on the port chosen.
    text = json.dumps(config)
    hosts = set(re.findall(r"(?:amqp|redis|http)://(?:[^@/\"]*@)?([^:/\"]+)", text))
    assert hosts == {"127.0.0.1"}, hosts
    rabbit = config["services"]["rabbitmq"]["environment"]
    for key in ("RABBITMQ_NODE_IP_ADDRESS", "RABBITMQ_DIST_IP", "RABBITMQ_MANAGEMENT_IP"):
        assert rabbit[key] == "127.0.0.1", key
    assert rabbit["ERL_EPMD_ADDRESS"] == "127.0.0.1"
    # Its own ports, not the machine's RabbitMQ (5672, 15672, 25672) and epmd (4369).
    assert [rabbit[key] for key in ("RABBITMQ_NODE_PORT", "RABBITMQ_DIST_PORT")] == [
        ports["SMOKE_AMQP_PORT"],
        ports["SMOKE_DIST_PORT"],
    ]
    assert rabbit["RABBITMQ_MANAGEMENT_PORT"] == ports["SMOKE_MANAGEMENT_PORT"]
    assert rabbit["ERL_EPMD_PORT"] == ports["SMOKE_EPMD_PORT"]
    redis_cmd = config["services"]["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--bind") + 1] == "127.0.0.1"
    assert redis_cmd[redis_cmd.index("--port") + 1] == ports["SMOKE_REDIS_PORT"]
    prometheus_cmd = config["services"]["prometheus"]["command"]
    assert f"--web.listen-address=127.0.0.1:{ports['SMOKE_PROMETHEUS_PORT']}" in prometheus_cmd
    metrics = {
        name: config["services"][name]["environment"]["CELERY_RELIABLE_METRICS_PORT"]
        for name in ("worker-1", "worker-2")
    }
    assert metrics == {
        "worker-1": ports["SMOKE_WORKER1_METRICS_PORT"],
        "worker-2": ports["SMOKE_WORKER2_METRICS_PORT"],
    }
    for name, port in [*metrics.items(), ("reaper", ports["SMOKE_REAPER_METRICS_PORT"])]:
        probe = " ".join(config["services"][name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in probe, name
