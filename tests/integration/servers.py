"""Start real servers on 127.0.0.1 for integration tests, and always clean them up."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
POSTGRES = "postgresql://postgres@127.0.0.1:5432"  # the machine's PostgreSQL (trust auth)


# Server ports come from below the kernel's ephemeral range (32768+ here, where bind(0), moto's
# port=0 and every outgoing connection's source port land) and away from Prefect's ephemeral
# server (8000-8999), so no client socket can take a port between free_port() and the server's
# bind. Each port is reserved with an flock held until this process exits: parallel pytest-xdist
# workers, and concurrent runs by the same user, never hand out the same port.
PORT_RANGE = range(20000, 32000)
PORT_LOCKS = Path(tempfile.gettempdir()) / f"evergreen-test-ports-{os.getuid()}"
_reserved: dict[int, int] = {}  # port -> fd of its lock file, open for the process's lifetime
_random = random.SystemRandom()  # not the global generator, which tests seed alike in each worker


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reserve(port: int) -> bool:
    """Take the port's lock file for this process (released by the kernel when it exits)."""
    fd = os.open(PORT_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _reserved[port] = fd
    return True


def free_port() -> int:
    """A loopback port nobody listens on that no other test process will be given."""
    PORT_LOCKS.mkdir(mode=0o700, exist_ok=True)
    for _ in range(200):
        port = _random.choice(PORT_RANGE)
        if port in _reserved or not _reserve(port):
            continue
        if _bindable(port):
            return port
        # held by something outside the test suite: keep the reservation, so it is not retried
    raise RuntimeError(f"no free port in {PORT_RANGE} after 200 tries")


def wait_http(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited early ({process.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def background(
    command: list[str], *, env: dict, log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run a command in its own process group; kill the whole group on exit."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=15)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def prefect_env(
    home: Path, api_url: str | None = None, database_url: str | None = None
) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url
        or f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


RETRIED_STATUS = (429, 502, 503)  # what Prefect's own client retries (PREFECT_CLIENT_MAX_RETRIES)


def prefect_request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """A REST call to a test Prefect server, retried with backoff as Prefect's own client
    retries a busy server (429/502/503, or no answer within the `timeout` given: a POST must
    then carry an idempotency key); the last attempt's error or response stands."""
    for attempt in range(6):
        last = attempt == 5
        try:
            response = httpx.request(method, url, **kwargs)
        except httpx.TimeoutException:
            if last:
                raise
        else:
            if response.status_code not in RETRIED_STATUS or last:
                return response
        time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A new, empty database on the local PostgreSQL, dropped afterwards; yields its libpq URL,
    or None when there is no PostgreSQL (or no driver) here, so the caller picks its fallback."""
    try:
        import psycopg2
    except ImportError:
        yield None
        return
    try:
        admin = psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=3)
    except psycopg2.OperationalError:
        yield None
        return
    admin.autocommit = True
    name = f"evergreen_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@contextmanager
def prefect_server(home: Path, *, backend: str = "sqlite") -> Iterator[str]:
    """A real `prefect server start` on a free loopback port; yields its API URL.

    `backend="postgresql"` puts its database on the local PostgreSQL, as production does: tests
    that run several flow runs at once against one server use it, because SQLite serialises
    every write and the server answers 503 while a write waits too long. Without a PostgreSQL
    here such a test falls back to SQLite and says so on stdout."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = home / "server.log"
    with postgres_database() if backend == "postgresql" else nullcontext() as database:
        if backend == "postgresql" and database is None:
            print("no PostgreSQL on 127.0.0.1:5432: the Prefect server runs on SQLite")
        url = database.replace("postgresql://", "postgresql+asyncpg://") if database else None
        with background(command, env=prefect_env(home, database_url=url), log=log) as process:
            api = f"http://127.0.0.1:{port}/api"
            wait_http(f"{api}/health", 180, process, log)
            yield api
