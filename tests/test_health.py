"""/healthz and /readyz of a real worker and of the reaper.

- A worker's /readyz is 200 only while it consumes, is registered in the store and is not
  draining: 503 while its store is down (heartbeats fail) and while it drains after SIGTERM;
  /healthz stays 200 through both, since its event loop keeps turning.
- The reaper's /readyz is 200 once a pass succeeded, /healthz while it runs passes.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request
from dataclasses import replace

from celery_reliable.testing import ReaperProcess, RedisServer, free_port, wait_for
from tests.apps import obs
from tests.apps.common import events
from tests.conftest import ROOT

FAST = {
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "0.3",
    "CELERY_RELIABLE_WORKER_TIMEOUT": "2",
    "CELERY_RELIABLE_REAPER_INTERVAL": "0.3",
}


def listening_on(port: int) -> set[str]:
    """The addresses a socket of this host listens on at ``port`` (from /proc/net)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                host, hexport = local.split(":")
                if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(host)
                # each 32-bit word is in the host's (little-endian) byte order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return resp.status, resp.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()
    except OSError as exc:
        return 0, repr(exc)


def test_worker_readyz_follows_store_registration_and_drain_while_healthz_stays_up(
    ns, start_worker
):
    store = RedisServer().start()  # the worker's own store, which the test takes away
    try:
        port = free_port()
        app = replace(ns, redis_url=store.url(1)).app(obs.build)
        worker = start_worker(
            "obs",
            env={
                **FAST,
                "CELERY_RELIABLE_METRICS_PORT": str(port),
                "CELERY_RELIABLE_METRICS_ADDRESS": "127.0.0.1",
                "CELERY_RELIABLE_DRAIN_TIMEOUT": "20",
                "CR_REDIS_URL": store.url(1),
            },
        )
        wait_for(lambda: probe(port, "/readyz") == (200, "ok"), 20, message="ready")
        assert probe(port, "/healthz") == (200, "ok")
        assert listening_on(port) == {"127.0.0.1"}  # reliable_metrics_address, not 0.0.0.0

        store.stop()  # heartbeats fail: not registered any more
        wait_for(
            lambda: probe(port, "/readyz")[0] == 503,
            10,
            message=lambda: f"503 without a store: {probe(port, '/readyz')}",
        )
        assert "not registered" in probe(port, "/readyz")[1]
        assert probe(port, "/healthz") == (200, "ok")
        store.start()
        wait_for(lambda: probe(port, "/readyz") == (200, "ok"), 20, message="ready again")

        app.tasks["obs.slow"].delay(3.0)
        wait_for(lambda: events(app, "slow_started"), 20, message="the slow task to start")
        worker.terminate()  # SIGTERM: drain
        wait_for(
            lambda: probe(port, "/readyz") == (503, "draining"),
            5,
            message=lambda: f"503 draining: {probe(port, '/readyz')}",
        )
        assert probe(port, "/healthz") == (200, "ok")
        assert worker.wait_exit(30) == 0
        assert events(app, "slow_done")
    finally:
        store.close()


def start_reaper(ns, port: int, log_path) -> ReaperProcess:
    """A reaper of the obs app serving its metrics on ``port``."""
    return ReaperProcess(
        "tests.apps.obs:app",
        env=ns.env(**FAST, CELERY_RELIABLE_REAPER_METRICS_PORT=str(port)),
        cwd=str(ROOT),
        log_path=log_path,
    )


def test_reaper_serves_readyz_after_a_pass_and_healthz(ns, tmp_path):
    port = free_port()
    reaper = start_reaper(ns, port, tmp_path / "reaper.log")
    try:
        reaper.wait_started()
        wait_for(lambda: probe(port, "/readyz") == (200, "ok"), 20, message=reaper.log)
        assert probe(port, "/healthz") == (200, "ok")
        status, text = probe(port, "/metrics")
        assert status == 200 and "celery_reliable_reaper_last_pass_timestamp_seconds" in text
    finally:
        reaper.close()


def test_a_taken_metrics_port_stops_the_worker_and_the_reaper_naming_the_setting(
    ns, start_worker, tmp_path
):
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = {
            **FAST,
            "CELERY_RELIABLE_METRICS_PORT": str(port),
            "CELERY_RELIABLE_METRICS_ADDRESS": "127.0.0.1",
        }
        worker = start_worker("obs", wait=False, env=settings)
        assert worker.wait_exit(60) != 0
        assert "reliable_metrics_port: cannot listen on 127.0.0.1 port" in worker.log()

        reaper = start_reaper(ns, port, tmp_path / "reaper.log")
        try:
            assert reaper.proc.wait(60) == 1
            assert f"cannot listen on 0.0.0.0 port {port}" in reaper.log()
            assert "Traceback" not in reaper.log()
        finally:
            reaper.close()
