"""One small HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

Used by the worker (:class:`~celery_reliable.metrics.exporter.MetricsStep`) and by the
reaper (:class:`~celery_reliable.metrics.cluster.ReaperExporter`). Each probe is a function
returning ``(ok, text)``; the answer is 200 with the text when ok, else 503.

Examples:
    >>> server = serve(9808, registry, healthz=lambda: (True, "ok"), readyz=...)
    >>> server.shutdown()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..core.config import DEFAULT_METRICS_ADDRESS

logger = logging.getLogger(__name__)

#: A health probe: ``() -> (ok, one line saying why)``.
Probe = Callable[[], tuple[bool, str]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


class MetricsServer:
    """A running server; :meth:`shutdown` stops it and frees the port."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(
    port: int, registry: Any, healthz: Probe, readyz: Probe, host: str = DEFAULT_METRICS_ADDRESS
) -> MetricsServer:
    """Serve ``registry`` on ``/metrics`` and the two probes, in a daemon thread.

    Raises:
        OSError: ``host:port`` cannot be listened on (in use, not an address of this host).
    """
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)
    probes = {"/healthz": healthz, "/readyz": readyz}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        try:
            ok, text = probe()
        except Exception as exc:  # a probe that breaks says so, it does not kill the server
            logger.exception("health probe failed")
            ok, text = False, f"probe failed: {exc!r}"
        status = "200 OK" if ok else "503 Service Unavailable"
        body = (text + "\n").encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    server_class = _Server6 if _is_ipv6(host) else _Server
    server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, name="reliable-metrics-http", daemon=True
    )
    thread.start()
    return MetricsServer(server, thread)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
