"""The version matrix and Celery's own integration tests, each in its own virtualenv.

    nox -s matrix                     # every supported Celery minor: the smoke subset
    nox -s "matrix(celery='5.5')"     # one entry
    nox -s peer                       # on demand: Celery's t/integration, plain vs ReliableTask
    nox -s peer -- 5.6                # the same against another entry's Celery
    nox -s peer -- -k replace         # more arguments go to both pytest runs

Virtualenvs live under ``.nox/``. Every download goes through one wheelhouse
(``$RELIABLE_WHEELHOUSE``, default ``~/.cache/celery-reliable/wheelhouse``): an entry's
wheels are fetched once with ``pip download`` and installed from there with ``--no-index``
afterwards, so a later run (CI from a fresh clone included) needs no index.

``MATRIX`` is what pyproject.toml's bounds admit, and nothing else: the oldest entry pins
every lower bound, the newest every upper one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).resolve().parent
nox.options.envdir = str(ROOT / ".nox")
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["matrix"]

#: Each supported Celery minor with the releases it is tested with: Celery's kombu pair,
#: redis-py (5.x where that kombu allows it, the newest major where it allows that),
#: and, in the oldest entry, the lowest billiard Celery 5.5 admits and the lowest
#: pybreaker and prometheus-client we admit.
MATRIX: dict[str, dict[str, str]] = {
    "5.5": {
        "celery": "5.5.3",
        "kombu": "5.5.4",
        "redis": "5.0.8",
        "billiard": "4.2.1",
        "pybreaker": "1.2.0",
        "prometheus-client": "0.20.0",
    },
    "5.6": {"celery": "5.6.3", "kombu": "5.6.2", "redis": "5.3.1"},
    "5.7": {"celery": "5.7.0", "kombu": "5.7.0", "redis": "8.1.0"},
}

#: The real-worker smoke subset each entry runs: the compatibility units, the Celery
#: features defects, and one test each of dead letters, kill -9 + reaper, drain (with an
#: ETA message), ordering and rate limit (deferred copies through a SIGTERM).
SMOKE = [
    "tests/test_settings.py",
    "tests/test_compat.py",
    "tests/test_celery_features.py",
    "tests/test_deadletter.py::test_exhausted_retries_are_dead_lettered_with_every_field",
    "tests/test_orphans.py::test_orphan_is_rerun_within_worker_timeout",
    "tests/test_drain.py::test_sigterm_returns_prefetched_within_a_second_and_waits_for_running",
    "tests/test_ordering.py::test_interleaved_keys_never_overlap_and_start_in_order",
    "tests/test_rate_limit.py::test_deferred_tasks_come_back_when_their_worker_gets_sigterm",
]

#: What the smoke subset needs besides the package (not the whole test extra: no linters).
SMOKE_TOOLS = ["pytest>=8", "pytest-timeout>=2.3", "pydantic>=2.4"]

#: Celery's integration tests the peer session runs, from Celery's source package.
PEER_TESTS = ["t/integration/test_tasks.py", "t/integration/test_canvas.py"]
#: Extra test tools Celery's integration suite needs (its flaky marker and time limits).
PEER_TOOLS = ["pytest>=9", "pytest-timeout>=2.3", "pytest-rerunfailures>=14", "pydantic>=2.4"]
#: Per-test time limit of the peer runs (Celery's own is 300 s on its CI, kept for both runs).
PEER_TIMEOUT = 300

WHEELHOUSE = Path(
    os.environ.get("RELIABLE_WHEELHOUSE")
    or Path.home() / ".cache" / "celery-reliable" / "wheelhouse"
)


def _project_requirements(extras: tuple[str, ...] = ("test",)) -> list[str]:
    """pyproject.toml's dependencies (and extras), as pip requirement strings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def _pins(entry: dict[str, str]) -> list[str]:
    return [f"{name}=={version}" for name, version in entry.items()]


def _install(
    session: nox.Session, name: str, pins: list[str], extra: list[str], project: str = ".[test]"
) -> None:
    """Install ``pins`` + the project (editable) + ``extra`` from the wheelhouse, fetching
    the wheels once (a stamp file per entry records a complete download)."""
    stamp = WHEELHOUSE / f"{name}.ok"
    build = ["setuptools>=77", "wheel"]
    extras = ("test",) if project.endswith("[test]") else ()
    wanted = [*pins, *_project_requirements(extras), *extra, *build]
    marker = "\n".join(wanted)
    if not stamp.exists() or stamp.read_text() != marker:
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        session.run("python", "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE), *wanted)
        stamp.write_text(marker)
    offline = ["--no-index", "--find-links", str(WHEELHOUSE)]
    session.run("python", "-m", "pip", "install", "-q", *offline, *build)
    session.run("python", "-m", "pip", "install", "-q", *offline, *pins, *extra, "-e", project)


@nox.session
@nox.parametrize("celery", list(MATRIX))
def matrix(session: nox.Session, celery: str) -> None:
    """One matrix entry: install its releases and run the smoke subset."""
    entry = MATRIX[celery]
    _install(session, f"matrix-{celery}", _pins(entry), SMOKE_TOOLS, project=".")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *SMOKE, *session.posargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@nox.session
def peer(session: nox.Session) -> None:
    """Celery's own t/integration test_tasks.py and test_canvas.py, twice: plain, and with
    every task a ReliableTask (task_cls) and install(app). Prints the difference and
    writes it to .nox/peer/<version>/report.md; fails when a test that passes plain does
    not pass with the extension."""
    args = list(session.posargs)
    minor = args.pop(0) if args and args[0] in MATRIX else max(MATRIX)
    entry = MATRIX[minor]
    _install(session, f"peer-{minor}", _pins(entry), PEER_TOOLS, project=".")
    work = ROOT / ".nox" / "peer" / entry["celery"]
    sdist_dir = WHEELHOUSE / "sdist"
    sdist = sdist_dir / f"celery-{entry['celery']}.tar.gz"
    if not sdist.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        session.run(
            "python", "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            "-d", str(sdist_dir), f"celery=={entry['celery']}",
        )  # fmt: skip
    # Only Celery's tests and their config: the installed celery is the one under test.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    top = f"celery-{entry['celery']}/"
    with tarfile.open(sdist) as tar:
        members = [
            m for m in tar.getmembers() if m.name.startswith((top + "t/", top + "pyproject.toml"))
        ]
        for m in members:
            m.name = m.name[len(top) :]
        tar.extractall(work, members=members, filter="data")
    port = _free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port)
        env = {
            "TEST_BROKER": f"redis://127.0.0.1:{port}/0",
            "TEST_BACKEND": f"redis://127.0.0.1:{port}/1",
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(port),
            "PYTHONPATH": str(ROOT / "tests" / "peer"),
        }
        reports = {}
        for run, plugin in (("plain", []), ("reliable", ["-p", "reliable_plugin"])):
            session.run("redis-cli", "-p", str(port), "flushall", external=True, silent=True)
            reports[run] = work / f"{run}.xml"
            started = time.monotonic()
            with session.chdir(work):
                session.run(
                    "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-p", "celery.contrib.pytest", *plugin, *PEER_TESTS, *args,
                    f"--timeout={PEER_TIMEOUT}", f"--junitxml={reports[run]}",
                    env=env, success_codes=[0, 1],
                )  # fmt: skip
            session.log(f"peer {run} run: {time.monotonic() - started:.0f}s")
        with session.chdir(ROOT):
            session.run(
                "python", str(ROOT / "tests" / "peer" / "compare.py"),
                str(reports["plain"]), str(reports["reliable"]),
                "--markdown", str(work / "report.md"),
            )  # fmt: skip
    finally:
        redis.terminate()
        redis.wait(10)


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"redis-server on port {port} did not start")
            time.sleep(0.05)
