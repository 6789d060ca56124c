"""A throwaway PostgreSQL server for the benchmarks, started the way the store tests start theirs
(``tests/observability/conftest.py``): Debian's ``initdb`` and ``pg_ctl`` from
``/usr/lib/postgresql/*/bin``, trust authentication, listening on 127.0.0.1 only, on a free port,
run as the ``postgres`` system user when we are root (``initdb`` refuses root).

Not a benchmark itself (the leading underscore keeps it apart from the ``bench_*.py`` scripts).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

START_TIMEOUT = 60  # seconds; pg_ctl -w waits until the server accepts connections, at most this


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries, no psycopg, or no ``postgres`` user to run the server as."""


def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` (else the directory of ``initdb`` on PATH)."""
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


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    version: str

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", *, autocommit: bool = True) -> Any:
        """A psycopg connection (autocommit by default: CREATE DATABASE, VACUUM)."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=database,
            autocommit=autocommit,
        )

    def admin(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement on the maintenance database; its rows (if any)."""
        with self.connect() as connection:
            cursor = connection.execute(sql, params or None)
            return list(cursor.fetchall()) if cursor.description else []

    def databases(self) -> set[str]:
        return {name for (name,) in self.admin("SELECT datname FROM pg_database")}


@contextmanager
def postgres_server(root: Path, settings: Sequence[str] = ()) -> Iterator[PostgresServer]:
    """A server whose cluster lives in ``root/data`` (made by ``initdb`` unless it is there
    already, so a kept cluster is started again as it was), its log in ``root/server.log``;
    ``settings`` are extra ``name=value`` server settings. Stopped (``pg_ctl stop -m fast``) at
    the end; ``root`` is left for the caller to keep or remove."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise PostgresUnavailable(
            "PostgreSQL's initdb/pg_ctl were not found (apt-get install postgresql)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError as error:
        raise PostgresUnavailable(
            "the psycopg driver is missing (pip install -e '.[postgres]')"
        ) from error

    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as error:
            raise PostgresUnavailable("running as root and there is no `postgres` user") from error
        as_user = ["runuser", "-u", "postgres", "--"]
        root.mkdir(parents=True, exist_ok=True)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    else:
        root.mkdir(parents=True, exist_ok=True)
    data, log = root / "data", root / "server.log"

    def run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def fail(step: str, result: subprocess.CompletedProcess[str]) -> NoReturn:
        details = result.stdout + result.stderr
        if log.exists():
            details += "\n--- server log ---\n" + log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"could not start PostgreSQL ({step}):\n{details}")

    if not (data / "PG_VERSION").exists():
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
    port = free_port()
    options = " ".join(
        [
            "-c listen_addresses=127.0.0.1",
            f"-p {port}",
            f"-c unix_socket_directories={root}",
            *(f"-c {setting}" for setting in settings),
        ]
    )
    start = run(
        str(bin_dir / "pg_ctl"),
        *("-D", str(data), "-l", str(log), "-o", options),
        *("-w", "-t", str(START_TIMEOUT), "start"),
        timeout=START_TIMEOUT + 10,
    )
    if start.returncode != 0:
        fail("pg_ctl start", start)
    try:
        server = PostgresServer("127.0.0.1", port, "postgres", "")
        (version,) = server.admin("SHOW server_version")[0]
        yield PostgresServer(server.host, server.port, server.user, str(version))
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
