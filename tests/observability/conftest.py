"""Fixtures for the event store tests: every store test runs on SQLite and on a real PostgreSQL.

The PostgreSQL server is a throwaway one started from Debian's ``postgresql`` package for the test
session (a temp data dir, trust auth on 127.0.0.1 only, a free port). Without the binaries the
PostgreSQL tests are skipped with an install hint, except in CI (``CI`` set), where they must run
and a missing server is an error.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kagura._instrument as instrument
from kagura import _storage as engine_registry
from kagura import observability
from kagura.observability import Recorder
from kagura.observability._handoff import wait_for_writers
from kagura.resilience import reset_breakers, reset_rate_limits

PG_STARTUP_TIMEOUT = 30.0
# A zone far from UTC (UTC+14): day grouping must not depend on the server's time zone.
PG_SERVER_TIMEZONE = "Pacific/Kiritimati"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """Run one statement on the maintenance database (autocommit: CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(sql)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"PostgreSQL tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(f"{reason}; install it with `apt-get install postgresql` to run these tests")


def _pg_bin() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session; stopped (``pg_ctl stop -m fast``) at the end."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        _unavailable("PostgreSQL's initdb/pg_ctl were not found (/usr/lib/postgresql/*/bin)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is missing (pip install -e '.[postgres]')")
    assert bin_dir is not None

    # initdb refuses to run as root: as root, the server runs as the `postgres` system user.
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no `postgres` system user")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    root = Path(tempfile.mkdtemp(prefix="kagura-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "server.log"
    port = free_port()
    server = PostgresServer("127.0.0.1", port, "postgres")

    def fail(step: str, result: subprocess.CompletedProcess[str] | None = None) -> None:
        details = "" if result is None else result.stdout + result.stderr
        if log.exists():
            details += "\n--- server log ---\n" + log.read_text(errors="replace")[-4000:]
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL ({step}):\n{details}", pytrace=False)

    initdb = run(
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "--auth-host=trust",
        "--auth-local=trust",
        "--encoding=UTF8",
        "--no-sync",
    )
    if initdb.returncode != 0:
        fail("initdb", initdb)
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
        f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        f"-c max_connections=200 -c TimeZone={PG_SERVER_TIMEZONE}"
    )
    start = run(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(log),
        "-o",
        options,
        "-w",
        "-t",
        str(int(PG_STARTUP_TIMEOUT)),
        "start",
        timeout=PG_STARTUP_TIMEOUT + 10,
    )
    if start.returncode != 0:
        fail("pg_ctl start", start)
    try:
        deadline = time.monotonic() + PG_STARTUP_TIMEOUT
        while True:  # bounded: the server is a separate process we can only poll
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", server.host, "-p", str(port), "-t", "1"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                fail("pg_isready")
            time.sleep(0.05)
        server.admin("CREATE DATABASE kagura_test")
        yield server
    finally:
        engine_registry.dispose_all()
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql://postgres@127.0.0.1:PORT/kagura_test``: the session's shared database."""
    return postgres_server.url("kagura_test")


_database_numbers = itertools.count(1)


def _forget_engine(url: str) -> None:
    """Close this process's pooled connections to ``url`` (so its database can be dropped)."""
    engine_registry.forget(engine_registry.normalise_url(url))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store: a SQLite file path, or a new PostgreSQL database for this test."""
    if request.param == "sqlite":
        path = str(tmp_path / "events.db")
        yield path
        _forget_engine(path)
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"kagura_t{os.getpid()}_{next(_database_numbers)}"
    server.admin(f"CREATE DATABASE {name}")
    url = server.url(name)
    yield url
    _forget_engine(url)
    server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql://")


@pytest.fixture
def record_to(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Recorder]]:
    """Point the default recorder at a store: ``record_to(url, KAGURA_RECORD_CONTENT="hash")``.

    Environment settings given as keywords are applied before the recorder is installed.
    """

    def install(url: str, **env: str) -> Recorder:
        monkeypatch.setenv("KAGURA_DB", url)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        observability.uninstall_default()
        instrument.reset_recording_check()
        return observability.install_default()

    yield install
    observability.uninstall_default()
    instrument.reset_recording_check()


@pytest.fixture
def recorder(store_url: str, record_to: Callable[..., Recorder]) -> Recorder:
    """The default recorder, writing to this test's fresh store."""
    return record_to(store_url)


@pytest.fixture(autouse=True)
def _isolated_policies() -> Iterator[None]:
    """Breakers and rate limits are process-wide: every test starts (and leaves) with none."""
    reset_breakers()
    reset_rate_limits()
    yield
    reset_breakers()
    reset_rate_limits()


def run_script(
    code: str, env: dict[str, str], *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python process (bounded), with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        check=False,
    )


def spawn_script(code: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start ``code`` in a fresh Python process; the caller bounds every wait on it."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(env),
    )


def child_env(env: dict[str, str]) -> dict[str, str]:
    full = {**os.environ, **env}
    for name in ("KAGURA_RECORD_CONTENT", "KAGURA_RECORD"):
        if name not in env:
            full.pop(name, None)
    return full


def rows(url: str, table: str = "kagura_spans") -> list[dict[str, Any]]:
    """Every row of a store table, read straight from the database (not through EventStore),
    once the writers that processes handed rows to as they exited have committed them (as
    every reader waits for them)."""
    from sqlalchemy import text

    wait_for_writers(engine_registry.normalise_url(url))
    engine = engine_registry.engine_for(engine_registry.normalise_url(url))
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text(f"SELECT * FROM {table}"))]


def wait_for_lock_waits(engine: Any, waiting: int) -> None:
    """Until ``waiting`` client sessions of the PostgreSQL database behind ``engine`` wait for a
    lock (bounded): how a test that makes a deadlock knows that a transaction is where it must
    be before the next one moves."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 60
    while True:
        with engine.connect() as connection:
            if connection.exec_driver_sql(query).scalar() == waiting:
                return
        assert time.monotonic() < deadline, f"{waiting} sessions never waited for a lock"
        time.sleep(0.01)


@pytest.fixture
def conflicts(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Every error the store's transactions were asked to be run again for (see
    ``kagura._storage.transaction``), as it happens."""
    from kagura._storage import _engine

    seen: list[BaseException] = []
    lost_to_another = _engine.lost_to_another

    def spy(error: BaseException) -> bool:
        seen.append(error)
        return lost_to_another(error)

    monkeypatch.setattr(_engine, "lost_to_another", spy)
    return seen
