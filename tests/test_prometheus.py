"""A real Prometheus scrapes two real workers and the reaper while tasks run.

It proves: every metric family of docs/metrics.md has samples; every panel query of
deploy/grafana/celery-reliable.json runs without error through Prometheus's HTTP API (and
returns data); the alert rules load and evaluate without error; and ``promtool check rules``
and ``promtool test rules`` (the rules' unit tests) pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_reliable.testing import ReaperProcess, free_port, wait_for
from tests.apps import obs
from tests.apps.common import events
from tests.conftest import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "celery-reliable.json"

#: Series names each family shows up as (histograms by their ``_bucket`` series).
WORKER_FAMILIES = (
    "celery_reliable_tasks_total",
    "celery_reliable_task_duration_seconds_bucket",
    "celery_reliable_dead_letters_total",
    "celery_reliable_deferrals_total",
    "celery_reliable_start_delay_seconds_bucket",
    "celery_reliable_breaker_state",
    "celery_reliable_draining",
    "celery_reliable_store_errors_total",
)
REAPER_FAMILIES = (
    "celery_reliable_workers",
    "celery_reliable_in_flight",
    "celery_reliable_dead_letters",
    "celery_reliable_orphans_recovered_total",
    "celery_reliable_ordering_parked",
    "celery_reliable_ordering_blocked_keys",
    "celery_reliable_breaker_state",
    "celery_reliable_rate_limit_tokens",
    "celery_reliable_reaper_pass_seconds_bucket",
    "celery_reliable_reaper_last_pass_timestamp_seconds",
)
FAST = {
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "0.5",
    "CELERY_RELIABLE_WORKER_TIMEOUT": "3",
    "CELERY_RELIABLE_REAPER_INTERVAL": "0.5",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: scripts/setup.sh installs Debian's prometheus package")
    return path


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, cwd=ALERTS.parent
        )
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    assert "SUCCESS" in done.stdout


class Prometheus:
    """A real ``prometheus`` server on a free port, scraping ``targets`` every 0.5 s."""

    def __init__(self, tmp: Path, jobs: dict[str, list[int]]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_timeout": "400ms",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
                }
                for job, ports in jobs.items()
            ],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    _tool("prometheus"),
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            self.ready, 60, message=lambda: f"prometheus ready:\n{self.log.read_text()[-2000:]}"
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with its error
            body = json.load(exc)
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def names(self, job: str) -> set[str]:
        rows = self.query(f'count by (__name__) ({{__name__=~"celery_reliable_.+",job="{job}"}})')
        return {r["metric"]["__name__"] for r in rows}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def reaper_factory() -> Iterator[Any]:
    started: list[ReaperProcess] = []

    def start(*args: Any, **kwargs: Any) -> ReaperProcess:
        reaper = ReaperProcess(*args, **kwargs)
        started.append(reaper)
        return reaper

    yield start
    for reaper in started:
        reaper.close()


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_prometheus_scrapes_two_workers_and_the_reaper_and_runs_every_dashboard_query(
    ns, start_worker, reaper_factory, tmp_path
):
    app = ns.app(obs.build)
    worker_ports = [free_port(), free_port()]
    reaper_port = free_port()
    for i, port in enumerate(worker_ports):
        start_worker(
            "obs",
            name=f"w{i + 1}",
            env={**FAST, "CELERY_RELIABLE_METRICS_PORT": str(port)},
            wait=False,
        )
    reaper = reaper_factory(
        "tests.apps.obs:app",
        env=ns.env(**FAST, CELERY_RELIABLE_REAPER_METRICS_PORT=str(reaper_port)),
        cwd=str(ROOT),
    )
    prom = Prometheus(
        tmp_path,
        {"celery-reliable-workers": worker_ports, "celery-reliable-reaper": [reaper_port]},
    )
    try:
        reaper.wait_started()
        # the tasks: every family and every deferral cause moves
        for i in range(10):
            app.tasks["obs.ok"].delay(i)
        app.tasks["obs.bad"].delay(1)
        for i in range(4):
            app.tasks["obs.limited"].delay(i)
        app.tasks["obs.guarded"].delay(1)
        wait_for(lambda: events(app, "guarded"), 30, message="the breaker's first failure")
        app.tasks["obs.guarded"].delay(2)
        app.tasks["obs.ordered"].delay("k", 1, 1.0)
        app.tasks["obs.ordered"].delay("k", 2)
        wait_for(lambda: len(events(app, "succeeded")) == 10, 60, message="10 successes")
        wait_for(lambda: len(events(app, "ordered")) == 2, 60, message="2 ordered runs")
        wait_for(lambda: len(events(app, "limited")) == 4, 60, message="4 limited runs")

        def families() -> bool:
            return set(WORKER_FAMILIES) <= prom.names("celery-reliable-workers") and set(
                REAPER_FAMILIES
            ) <= prom.names("celery-reliable-reaper")

        wait_for(
            families,
            60,
            message=lambda: (
                f"every family in Prometheus; workers miss "
                f"{set(WORKER_FAMILIES) - prom.names('celery-reliable-workers')}, reaper misses "
                f"{set(REAPER_FAMILIES) - prom.names('celery-reliable-reaper')}"
            ),
        )

        def scalar(expr: str) -> float | None:
            rows = prom.query(expr)
            return float(rows[0]["value"][1]) if rows else None

        # summed over both workers' prefork processes: exactly the ten successes
        ok = 'sum(celery_reliable_tasks_total{task="obs.ok",outcome="succeeded"})'
        wait_for(lambda: scalar(ok) == 10, 30, message=lambda: f"{ok} == 10: {scalar(ok)}")
        causes = 'count by (cause) (celery_reliable_deferrals_total{job="celery-reliable-workers"})'
        wait_for(
            lambda: (
                {r["metric"]["cause"] for r in prom.query(causes)}
                >= {"rate_limit", "breaker", "ordering"}
            ),
            30,
            message=lambda: f"deferrals of every cause: {prom.query(causes)}",
        )
        dead = 'max(celery_reliable_dead_letters{reason="dead_letter_for"})'
        wait_for(lambda: scalar(dead) == 1, 30, message=lambda: f"{dead} == 1: {scalar(dead)}")
        workers = "max(celery_reliable_workers)"
        wait_for(
            lambda: scalar(workers) == 2, 30, message=lambda: f"2 live workers: {scalar(workers)}"
        )
        opened = (
            'max(celery_reliable_breaker_state{breaker="obs-vendor",job="celery-reliable-reaper"})'
        )
        wait_for(lambda: scalar(opened) == 2, 30, message=lambda: f"breaker open: {scalar(opened)}")

        # every dashboard query runs, and shows data once rate() has two samples
        queries = dashboard_queries()
        assert len(queries) >= 20

        def all_have_data() -> list[str]:
            empty = []
            for title, expr in queries:
                body = prom.api("query", query=expr)
                assert body["status"] == "success", f"panel {title!r}: {expr}: {body}"
                if not body["data"]["result"]:
                    empty.append(f"{title}: {expr}")
            return empty

        wait_for(
            lambda: not all_have_data(),
            30,
            message=lambda: "data for every panel; empty: " + "; ".join(all_have_data()),
        )
        # the alert rules are loaded and evaluate without error
        groups = prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 7
        wait_for(
            lambda: all(
                r.get("health") == "ok"
                for g in prom.api("rules")["data"]["groups"]
                for r in g["rules"]
            ),
            20,
            message=lambda: f"healthy rules: {prom.api('rules')}",
        )
        # the open breaker is pending or firing (its `for` is 1 m), no worker alert is
        alerts = {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]}
        assert "CeleryReliableBreakerOpen" in alerts
        assert "CeleryReliableNoLiveWorkers" not in alerts
    finally:
        prom.close()
