"""Test helpers and a pytest plugin: real Redis servers and real ``celery worker`` processes.

Loaded by pytest automatically (``pytest11`` entry point) when celery-reliable is
installed; it only defines fixtures, so it costs nothing until one is requested.

- :class:`RedisServer`: a private ``redis-server`` on a free port, which a test can kill,
  restart or stop, and which never touches data it did not make.
- :class:`WorkerProcess`: a real ``celery worker`` subprocess (prefork by default) in its own
  process group, so ``kill -9`` takes the whole worker; its log is kept in a file.
- :func:`wait_for`: poll a condition with a deadline, never a fixed sleep.
- Fixtures: ``reliable_redis_server`` (session), ``reliable_worker_factory`` (function;
  every worker it started is killed at teardown), ``reliable_dead_letters`` (a
  :class:`DeadLetterProbe`: list, wait for and assert on an app's dead letters).

Examples:
    >>> def test_charge_dead_letters(reliable_worker_factory, reliable_dead_letters):
    ...     worker = reliable_worker_factory("myproj.celery:app", env={...})
    ...     worker.wait_ready()
    ...     result = charge.delay(1, 2)
    ...     entry = reliable_dead_letters.wait(app, result.id, reason="max_retries")
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: Seconds a helper waits for a process to come up or go away, unless told otherwise.
DEFAULT_TIMEOUT = 30.0
#: Seconds between polls in :func:`wait_for`.
POLL_INTERVAL = 0.05
#: The line Celery logs when a worker is consuming.
READY_MARKER = " ready."


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline."""


def wait_for(
    condition: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = POLL_INTERVAL,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; return that, or raise WaitTimeout.

    ``message`` (or a callable producing it, evaluated on timeout) describes what was
    awaited, so a failing test says what it was waiting for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 and a free port, in a temp directory.

    Parameters:
      port: the port (default: a free one; kept across restarts).
      binary: the ``redis-server`` executable.
      args: more ``redis-server`` arguments (``["--appendonly", "yes"]`` keeps the data
        across :meth:`stop`/:meth:`start`; ``["--requirepass", "s3cret"]``).

    Examples:
        >>> server = RedisServer().start()
        >>> server.url(1)
        'redis://127.0.0.1:50123/1'
        >>> server.kill(); server.start()
    """

    def __init__(
        self, port: int | None = None, binary: str = "redis-server", args: Sequence[str] = ()
    ) -> None:
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(f"{binary} not found on PATH (apt-get install redis-server)")
        self.binary = path
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="reliable-redis-"))
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> RedisServer:
        """Start (or restart) the server and wait until it answers PING."""
        if self.running:
            return self
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(self.ping, timeout, message=f"redis-server on port {self.port} to answer")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up (maybe locked)
        except OSError:
            return False

    def kill(self) -> None:
        """``kill -9`` the server (a crash: everything in memory is gone)."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server gracefully."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(DEFAULT_TIMEOUT)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProcess:
    """A real ``celery worker`` subprocess in its own process group.

    Parameters:
      app: the ``-A`` argument (``module:app``).
      name: the worker's name; its node name is ``name-<6 hex digits>@%h``, unique, so
        suites that share one RabbitMQ never collide on a node's pidbox queue.
      queues: queues to consume (``-Q``).
      concurrency: pool processes.
      pool: the pool (``prefork`` by default, the one users run).
      env: extra environment variables.
      args: extra command-line arguments.
      cwd: working directory (default: the current one).
    """

    def __init__(
        self,
        app: str,
        *,
        name: str = "w1",
        queues: Sequence[str] = (),
        concurrency: int = 2,
        pool: str = "prefork",
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        cwd: str | os.PathLike[str] | None = None,
        loglevel: str = "INFO",
        log_dir: Path | None = None,
    ) -> None:
        self.app = app
        self.name = name
        self.node = f"{name}-{secrets.token_hex(3)}"
        self.queues = list(queues)
        self.concurrency = concurrency
        self.pool = pool
        self.env = dict(env or {})
        self.args = list(args)
        self.cwd = cwd
        self.loglevel = loglevel
        self.log_path = (log_dir or Path(tempfile.mkdtemp(prefix="reliable-worker-"))) / (
            f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def nodename(self) -> str:
        return f"{self.node}@{socket.gethostname()}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "-n",
            f"{self.node}@%h",
            "-l",
            self.loglevel,
            "--without-mingle",
            "--without-gossip",
        ]
        if self.queues:
            cmd += ["-Q", ",".join(self.queues)]
        return cmd + self.args

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> WorkerProcess:
        """Wait until the worker logs that it is consuming."""

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            return READY_MARKER in self.log()

        wait_for(ready, timeout, message=lambda: f"worker {self.name} ready:\n{self.log()[-3000:]}")
        return self

    def wait_log(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        wait_for(
            lambda: text in self.log(),
            timeout,
            message=lambda: f"{text!r} in {self.name}'s log:\n{self.log()[-3000:]}",
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """``kill -9`` the whole worker: main process and every pool process."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(DEFAULT_TIMEOUT)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only (as a platform's SIGTERM does)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the main process to exit; return its exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(
                f"worker {self.name} still running after {timeout}s:\n{self.log()[-3000:]}"
            ) from None

    def close(self) -> None:
        """Kill the whole process group if anything of it is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(DEFAULT_TIMEOUT)


class ReaperProcess:
    """A real ``celery -A APP reliable-reaper`` subprocess in its own process group.

    Parameters:
      app: the ``-A`` argument (``module:app``).
      env: extra environment variables (``CELERY_RELIABLE_*`` settings...).
      log_path: where its output goes.
      interval: ``--interval`` in seconds (default: the app's setting).
      cwd: working directory.
    """

    def __init__(
        self,
        app: str,
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        interval: float | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="reliable-reaper-")) / "reaper.log"
        cmd = [sys.executable, "-m", "celery", "-A", app, "reliable-reaper"]
        if interval is not None:
            cmd += ["--interval", str(interval)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                cwd=cwd,
                start_new_session=True,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_started(self, timeout: float = DEFAULT_TIMEOUT) -> ReaperProcess:
        """Wait until the reaper logs its first pass."""

        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"reaper exited {self.proc.returncode}:\n{self.log()}")
            return "reaper: started" in self.log()

        wait_for(started, timeout, message=lambda: f"reaper start:\n{self.log()[-2000:]}")
        return self

    def close(self) -> None:
        """Kill the reaper's process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(DEFAULT_TIMEOUT)


#: Seconds a cluster node may be unreachable before the cluster marks it failed.
CLUSTER_NODE_TIMEOUT_MS = 2000
#: Sentinel declares a master down after this many ms without a reply.
SENTINEL_DOWN_AFTER_MS = 1000
#: Sentinel's failover timeout (also the pause before it retries a failed failover).
SENTINEL_FAILOVER_TIMEOUT_MS = 5000


def _command(port: int, *args: str) -> str:
    """Run one command on a local Redis with redis-cli; its output."""
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=DEFAULT_TIMEOUT,
    )
    return done.stdout


#: Redis Cluster's bus listens on the node's port + this; both must be free (and < 65536).
CLUSTER_BUS_OFFSET = 10000


def free_cluster_port(attempts: int = 100) -> int:
    """A free port whose cluster-bus port (+10000) is free too."""
    for _ in range(attempts):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterServers:
    """A Redis Cluster of ``masters`` masters (no replicas) on free ports, made with
    ``redis-cli --cluster create``.

    Examples:
        >>> cluster = RedisClusterServers().start()
        >>> cluster.url()
        'redis+cluster://127.0.0.1:50101,127.0.0.1:50102,127.0.0.1:50103/'
    """

    def __init__(self, masters: int = 3) -> None:
        self.servers = [
            RedisServer(
                port=free_cluster_port(),
                args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(CLUSTER_NODE_TIMEOUT_MS),
                ],
            )
            for _ in range(masters)
        ]

    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.servers)
        return f"redis+cluster://{nodes}/"

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> RedisClusterServers:
        try:
            return self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> RedisClusterServers:
        for server in self.servers:
            server.start(timeout)
        done = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in self.servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        wait_for(
            lambda: all(
                "cluster_state:ok" in _command(s.port, "cluster", "info") for s in self.servers
            ),
            timeout,
            message="every cluster node to see every slot covered",
        )
        return self

    def close(self) -> None:
        for server in self.servers:
            server.close()


class RedisSentinelSetup:
    """A master, a replica of it and one Sentinel (``redis-server --sentinel``) watching
    them as ``master_name``; the Sentinel promotes the replica when the master dies.

    Examples:
        >>> setup = RedisSentinelSetup().start()
        >>> setup.url(1), setup.master_name
        ('sentinel://127.0.0.1:50120/1', 'reliable-test')
        >>> setup.kill_master(); setup.wait_promoted()
    """

    master_name = "reliable-test"

    def __init__(self) -> None:
        self.master = RedisServer()
        self.replica = RedisServer(args=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="reliable-sentinel-"))
        self.sentinel: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel_port}/{db}"

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> RedisSentinelSetup:
        try:
            return self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> RedisSentinelSetup:
        self.master.start(timeout)
        self.replica.start(timeout)
        wait_for(
            lambda: "master_link_status:up" in _command(self.replica.port, "info", "replication"),
            timeout,
            message="the replica to sync with its master",
        )
        config = self.dir / "sentinel.conf"
        name = self.master_name
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {name} {SENTINEL_DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {name} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
        )
        log = open(self.dir / "sentinel.log", "ab")  # noqa: SIM115 (closed with the process)
        self.sentinel = subprocess.Popen(
            [self.master.binary, str(config), "--sentinel"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(
            lambda: (
                str(self.replica.port) in _command(self.sentinel_port, "sentinel", "replicas", name)
            ),
            timeout,
            message="the Sentinel to know the replica",
        )
        return self

    def master_port(self) -> int | None:
        """The port of the master as the Sentinel sees it now."""
        reply = _command(
            self.sentinel_port, "sentinel", "get-master-addr-by-name", self.master_name
        )
        lines = reply.split()
        return int(lines[1]) if len(lines) == 2 else None

    def kill_master(self) -> None:
        """``kill -9`` the master (the replica is promoted after the Sentinel's timeout)."""
        self.master.kill()

    def wait_promoted(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until the Sentinel names the replica as the master and it accepts writes."""
        wait_for(
            lambda: (
                self.master_port() == self.replica.port
                and "role:master" in _command(self.replica.port, "info", "replication")
            ),
            timeout,
            message="the Sentinel to promote the replica",
        )

    def close(self) -> None:
        if self.sentinel is not None:
            with contextlib.suppress(ProcessLookupError):
                self.sentinel.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sentinel.wait(DEFAULT_TIMEOUT)
        self.master.close()
        self.replica.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def reliable_redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the test session (restartable, killable)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def reliable_worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real ``celery worker`` processes; all are killed at teardown.

    Call it like :class:`WorkerProcess` (``factory("proj:app", name="w1", env={...})``);
    the worker is started and returned (call ``wait_ready()`` on it).
    """
    workers: list[WorkerProcess] = []

    def start(app: str, **kwargs: Any) -> WorkerProcess:
        kwargs.setdefault("log_dir", tmp_path)
        worker = WorkerProcess(app, **kwargs).start()
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.close()


class DeadLetterProbe:
    """Read and wait on an app's dead letters in a test (the ``reliable_dead_letters``
    fixture). Calling it lists every dead letter, newest first.

    Examples:
        >>> def test_bad_charge(reliable_dead_letters):
        ...     result = charge.delay(-1)
        ...     entry = reliable_dead_letters.wait(app, result.id, reason="dead_letter_for")
        ...     assert entry.exception == "shop.InvalidAmount"
        ...     assert reliable_dead_letters(app) == [entry]
    """

    # Imported on use: this module is a pytest plugin that every pytest run of a project
    # with the package installed loads; it must not import Celery and redis at start.
    def __call__(self, app: Any) -> list[Any]:
        from .deadletters.store import DeadLetterStore

        return DeadLetterStore(app).list(limit=None)

    def wait(
        self,
        app: Any,
        task_id: str,
        reason: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Wait until task ``task_id`` is dead-lettered; return its ``DeadLetter``.

        Raises:
            WaitTimeout: it was not dead-lettered in time (the message lists what was).
            AssertionError: it was, but with another ``reason``.
        """
        from .deadletters.store import DeadLetterStore
        from .errors import DeadLetterNotFound

        store = DeadLetterStore(app)

        def find() -> Any:
            try:
                return store.get(task_id)
            except DeadLetterNotFound:
                return None

        entry = wait_for(
            find,
            timeout,
            message=lambda: f"dead letter {task_id}; stored: {[e.id for e in self(app)]}",
        )
        if reason is not None and entry.reason != reason:
            raise AssertionError(
                f"dead letter {task_id} has reason {entry.reason!r}, not {reason!r}: "
                f"{entry.exception}: {entry.error}"
            )
        return entry

    def assert_none(self, app: Any) -> None:
        """Fail listing what is there if ``app`` has any dead letter."""
        entries = self(app)
        if entries:
            lines = [f"{e.id} {e.task} {e.reason}: {e.exception}: {e.error}" for e in entries]
            raise AssertionError("unexpected dead letters:\n" + "\n".join(lines))


@pytest.fixture
def reliable_dead_letters() -> DeadLetterProbe:
    """A :class:`DeadLetterProbe`: ``reliable_dead_letters(app)`` lists every dead letter;
    ``.wait(app, task_id, reason=...)`` waits for one; ``.assert_none(app)``."""
    return DeadLetterProbe()


@pytest.fixture(scope="session")
def reliable_redis_cluster() -> Iterator[RedisClusterServers]:
    """A three-master Redis Cluster for the test session (``.url()`` is its store URL)."""
    cluster = RedisClusterServers().start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def reliable_redis_sentinel() -> Iterator[RedisSentinelSetup]:
    """A master, its replica and a Sentinel, fresh for each test (a test may kill the
    master): ``.url(db)`` and ``.master_name`` configure the store."""
    setup = RedisSentinelSetup().start()
    try:
        yield setup
    finally:
        setup.close()
