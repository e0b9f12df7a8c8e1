"""Render the smoke run's compose file: ``docker-compose config`` output in, file out.

``scripts/compose-smoke.sh`` merges docker-compose.yml with docker-compose.smoke.yml through
``docker-compose config`` and pipes the result here. Docker refuses published ports with
``network_mode: host`` and a compose override cannot remove a list, so this drops every
service's ``ports`` (each service listens on its own 127.0.0.1 port instead) and keeps only
the services named on the command line (Grafana is left out)::

    docker-compose -f docker-compose.yml -f deploy/smoke/docker-compose.smoke.yml config \\
        | python3 deploy/smoke/render.py redis rabbitmq ... > smoke.yml
"""

from __future__ import annotations

import sys
from typing import Any

import yaml


def render(config: dict[str, Any], services: list[str]) -> dict[str, Any]:
    unknown = set(services) - set(config["services"])
    if unknown:
        raise SystemExit(f"no such services: {sorted(unknown)}")
    config["services"] = {name: config["services"][name] for name in services}
    for service in config["services"].values():
        service.pop("ports", None)
    return config


if __name__ == "__main__":
    yaml.safe_dump(render(yaml.safe_load(sys.stdin), sys.argv[1:]), sys.stdout, sort_keys=False)
