"""Store faults are Kagura errors: a store that cannot be opened, read or written raises a
:class:`~kagura.errors.StoreError` naming it (its path, or its URL without the password) and the
cause; the recorder says so once and never affects the application's calls; ``kagura monitor``
reads a store in a directory its user may not write.

Permissions are real: the faults are made by a user who may not write the store (root writes
wherever it likes), in a subprocess. See :func:`unprivileged`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine as sqlalchemy_engine
from sqlalchemy import exc, text

from kagura import _storage as engines
from kagura._storage import (
    engine_for,
    is_store_fault,
    normalise_url,
    store_error,
    store_errors,
)
from kagura.errors import StoreError
from kagura.observability import EventStore, Recorder, _recorder, _writer
from kagura.observability._handoff import wait_for_writers
from kagura.observability._writer import ROW_WIDTH, StoreWriter
from kagura.observability._writer_log import LOG_NAME
from kagura.testing import FakeModel, override_model

from .conftest import (
    PostgresServer,
    _forget_engine,
    child_env,
    free_port,
    is_postgres,
    rows,
    run_script,
)

SUBPROCESS_TIMEOUT = 60.0
PASSWORD = "hunter2-never-shown"


# -- running as a user who may not write --------------------------------------------------------


@pytest.fixture(scope="session")
def unprivileged() -> list[str]:
    """The command prefix that runs a program as a user who may not write what it does not own
    and is not writable by everyone: none for a user other than root. Root writes wherever it
    likes, so as root: ``nobody``, keeping only the capability to read any file (not write it),
    since the interpreter may live where ``nobody`` cannot reach (under /root, say)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux) to run as another user")
    prefix = [
        setpriv,
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--",
    ]
    check = subprocess.run(
        [*prefix, sys.executable, "-c", "import os, kagura; print(os.geteuid())"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=child_env({}),
        check=False,
    )
    if check.returncode != 0 or check.stdout.strip() != "65534":
        pytest.skip(f"cannot run Python as nobody here: {check.stderr.strip()[-300:]}")
    return prefix


def run_as(
    prefix: list[str], argv: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=child_env({"PYTHONDONTWRITEBYTECODE": "1", **env}),
        check=False,
    )


def read_only(directory: Path, mode: int = 0o555) -> None:
    """Every file in ``directory`` readable by all and writable by none, and the directory
    ``mode`` (by default: nobody may make files in it)."""
    for path in directory.iterdir():
        path.chmod(0o444)
    directory.chmod(mode)


@pytest.fixture
def store_dir() -> Iterator[Path]:
    """A directory for a SQLite store that every user can reach, as a shared store's is (not
    under pytest's temporary directories, which only their owner can: SQLite looks for its -wal
    file with access(2), which ignores the capability the unprivileged user reads with)."""
    directory = Path(tempfile.mkdtemp(prefix="kagura-store-")) / "store"
    directory.parent.chmod(0o755)
    directory.mkdir()
    yield directory
    directory.chmod(0o755)
    shutil.rmtree(directory.parent)


MADE_BY_A_RUN = """
import asyncio
from kagura import agent

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

async def main() -> None:
    for n in range(3):
        await summarise(f"doc {n}")

asyncio.run(main())
"""


def made_by_a_run(url: str) -> None:
    """A store as a normal run leaves it: three agent calls recorded, the process ended, and
    the writer it handed its last rows to at exit ended too (until then its -wal and -shm files
    may still be there, and a store made read-only meanwhile could still be opened)."""
    result = run_script(
        MADE_BY_A_RUN, {"KAGURA_DB": url, "KAGURA_MODEL": "fake"}, timeout=SUBPROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    wait_for_writers(normalise_url(url))


# -- PostgreSQL roles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    name: str
    url: str  # with the role's password


@pytest.fixture
def pg_role(store_url: str) -> Iterator[Callable[[str], Role]]:
    """``make(grants)``: a login role with a password on this test's PostgreSQL database, given
    ``grants`` there ("" for none beyond connecting). Dropped at the end."""
    assert is_postgres(store_url), "roles are PostgreSQL's: see ON_POSTGRES"
    import psycopg

    server = _server_of(store_url)
    database = store_url.rsplit("/", 1)[1]
    made: list[Role] = []

    def admin(*statements: str) -> None:
        """As the superuser, on this test's database (not through the store: its schema is
        made or not as each test wants)."""
        with psycopg.connect(
            host=server.host, port=server.port, user=server.user, dbname=database, autocommit=True
        ) as connection:
            for statement in statements:
                connection.execute(statement)  # type: ignore[arg-type]

    def make(grants: str) -> Role:
        name = f"kagura_role_{os.getpid()}_{len(made)}"
        admin(
            f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'",
            f"GRANT CONNECT ON DATABASE {database} TO {name}",
            *([grants.format(role=name)] if grants else []),
        )
        role = Role(name, f"postgresql://{name}:{PASSWORD}@{server.host}:{server.port}/{database}")
        made.append(role)
        return role

    yield make
    for role in made:
        _forget_engine(role.url)
        admin(f"DROP OWNED BY {role.name}", f"DROP ROLE {role.name}")


def _server_of(url: str) -> PostgresServer:
    user, address = url.split("://", 1)[1].split("/", 1)[0].split("@")
    host, port = address.rsplit(":", 1)
    return PostgresServer(host, int(port), user)


#: For tests of what only PostgreSQL has (roles; a database that goes away while it is read: a
#: SQLite file being read stays open).
ON_POSTGRES = pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
SELECT_ONLY = "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"


# -- opening a store ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Unopenable:
    url: str
    name: str  # how messages name the store
    cause: str  # what they say the cause is
    from_the_driver: bool = True  # said by the database's driver (the error's __cause__)


FOREIGN = (
    "the file is another program's database, not a Kagura store (it holds other tables, "
    "notes, users, and none of Kagura's)"
)


def another_programs_database(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.commit()
    return path


@pytest.fixture(
    params=[
        "damaged file",
        "another program's database",
        "directory",
        "under a file",
        "closed port",
        "bad parameter",
        "no database",
        "no role",
    ]
)
def unopenable(request: pytest.FixtureRequest, tmp_path: Path) -> Unopenable:
    kind: str = request.param
    if kind == "damaged file":
        path = tmp_path / "events.db"
        path.write_bytes(bytes(range(256)) * 64)
        return Unopenable(str(path), str(path), "file is not a database")
    if kind == "another program's database":
        path = another_programs_database(tmp_path / "app.db")
        return Unopenable(str(path), str(path), FOREIGN, from_the_driver=False)
    if kind == "directory":
        path = tmp_path / "events.db"
        path.mkdir()
        return Unopenable(str(path), str(path), "unable to open database file (it is a directory)")
    if kind == "under a file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        path = blocker / "sub" / "events.db"
        return Unopenable(
            str(path),
            str(path),
            f"cannot create its directory {path.parent}: {blocker} is not a directory",
        )
    if kind == "closed port":
        port = free_port()
        url = f"postgresql://kagura:{PASSWORD}@127.0.0.1:{port}/kagura"
        return Unopenable(url, f"postgresql://kagura:***@127.0.0.1:{port}/kagura", "refused")
    if kind == "bad parameter":  # refused by psycopg before it connects
        url = f"postgresql://kagura:{PASSWORD}@127.0.0.1:5432/kagura?connect_timeout=abc"
        name = "postgresql://kagura:***@127.0.0.1:5432/kagura?connect_timeout=abc"
        return Unopenable(url, name, "bad value for connect_timeout: 'abc'")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    host = f"{server.host}:{server.port}"
    if kind == "no database":
        url = f"postgresql://{server.user}:{PASSWORD}@{host}/kagura_no_such_db"
        name = f"postgresql://{server.user}:***@{host}/kagura_no_such_db"
        return Unopenable(url, name, 'database "kagura_no_such_db" does not exist')
    url = f"postgresql://kagura_no_such_role:{PASSWORD}@{host}/kagura_test"
    name = f"postgresql://kagura_no_such_role:***@{host}/kagura_test"
    return Unopenable(url, name, 'role "kagura_no_such_role" does not exist')


def test_a_store_that_cannot_be_opened_is_a_store_error_naming_it_and_the_cause(
    unopenable: Unopenable,
) -> None:
    url = normalise_url(unopenable.url)
    with pytest.raises(StoreError) as raised:
        engine_for(url)
    message = str(raised.value)
    assert message.startswith(f"event store {unopenable.name}: cannot ")
    assert unopenable.cause in message
    assert "\n" not in message
    assert PASSWORD not in message
    assert raised.value.store == unopenable.name
    if unopenable.from_the_driver:
        assert raised.value.__cause__ is not None  # the driver's exception, for whoever digs
    # The same through the query API, every time (nothing half-opened is kept).
    for _ in range(2):
        with pytest.raises(StoreError) as again:
            EventStore(unopenable.url).get_executions()
        assert str(again.value) == message


async def test_another_programs_database_is_left_as_it_was(
    record_to: Callable[..., Recorder], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # KAGURA_DB set to the application's own database by mistake: none of Kagura's tables go
    # into it, and the file keeps its journal mode (WAL would be the file's from then on).
    from kagura import agent

    @agent
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    path = another_programs_database(tmp_path / "app.db")
    recorder = record_to(str(path))
    with override_model(FakeModel()):
        assert await summarise("notes") == "Summarise: notes"  # the application goes on
        assert recorder.flush() is False
    assert recorder.broken
    with pytest.raises(StoreError, match="another program's database"):
        EventStore(str(path)).get_executions()
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
        assert tables == ["users", "notes"]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    off = [m for m in caplog.messages if "recording is off" in m]
    assert off == [
        f"kagura: recording is off: event store {path}: cannot open: {FOREIGN}; "
        "give Kagura a file of its own (KAGURA_DB, or the store's path)"
    ]


def test_a_sqlite_url_of_a_relative_path_is_pointed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sqlite:///tmp/... is ./tmp/..., not /tmp/...: a store no other directory finds.
    monkeypatch.chdir(tmp_path)
    relative = f"sqlite:///{str(tmp_path).lstrip('/')}/events.db"
    with pytest.warns(UserWarning) as warned:
        assert normalise_url(relative) == relative
    (warning,) = warned
    assert str(warning.message) == (
        f"the store {relative} is the file {tmp_path}/{str(tmp_path).lstrip('/')}/events.db, "
        "under the current directory (a SQLite URL's three slashes start a relative path): "
        f"for {tmp_path}/events.db, write sqlite:///{tmp_path}/events.db or the path itself"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalise_url(relative)  # once a process
        normalise_url(f"sqlite:///{tmp_path}/events.db")  # four slashes: absolute
        normalise_url("events.db")  # a plain path means what it says
        normalise_url("sqlite:///:memory:")


def test_a_new_store_that_another_connection_is_writing_opens_once_it_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new SQLite store is in rollback mode until a first connection switches it to WAL. A
    connection switching it while another held its write lock was refused at once ("database is
    locked"), busy timeout or not (see ``_engine._switch_to_wal``). Two writer processes opening
    a new store together met it, a forked child's and its parent's, and the child's recording
    was turned off. Here the test holds the other connection, and lets it go when the opener
    waits for it."""
    from kagura._storage import _engine

    path = tmp_path / "events.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock, the store still in rollback mode
    other.execute("CREATE TABLE elsewhere (x)")
    waits: list[float] = []

    def let_go(seconds: float) -> None:
        waits.append(seconds)
        other.execute("COMMIT")

    monkeypatch.setattr(_engine, "_wait_for_the_lock", let_go)
    url = normalise_url(path)
    try:
        with engine_for(url).connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        other.close()
        engines.forget(url)
    assert len(waits) == 1


def test_the_wal_is_cut_back_once_a_checkpoint_has_emptied_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reuses a WAL file from its start after a checkpoint rather than shrink it: a
    store read while it was written (a reader holding a snapshot holds checkpoints back) kept
    the largest WAL it had ever had. Here with a limit of 64 KiB for a WAL of a few MB."""
    from kagura._storage import _engine

    monkeypatch.setattr(_engine, "WAL_SIZE_LIMIT", 64 * 1024)
    url = normalise_url(tmp_path / "events.db")
    wal = tmp_path / "events.db-wal"
    try:
        with engine_for(url).connect() as connection:
            connection.exec_driver_sql("CREATE TABLE filler (x)")
            connection.exec_driver_sql(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) "
                "INSERT INTO filler SELECT randomblob(1000) FROM n"
            )
            connection.commit()
            assert wal.stat().st_size > 1_000_000
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            connection.exec_driver_sql("INSERT INTO filler VALUES (1)")  # the WAL starts over
            connection.commit()
        assert wal.stat().st_size <= 64 * 1024
    finally:
        engines.forget(url)


@ON_POSTGRES
def test_a_role_that_may_not_create_the_schema_cannot_open_the_store(
    pg_role: Callable[[str], Role],
) -> None:
    role = pg_role("")
    with pytest.raises(StoreError) as raised:
        engine_for(normalise_url(role.url))
    assert "cannot open: permission denied for schema public" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_a_missing_postgres_driver_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    url = f"postgresql://kagura:{PASSWORD}@127.0.0.1:{free_port()}/kagura_no_driver"
    with pytest.raises(StoreError) as raised:
        engine_for(normalise_url(url))
    assert "pip install 'kagura[postgres]'" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_bugs_are_not_store_errors(store_url: str) -> None:
    url = normalise_url(store_url)
    engine = engine_for(url)
    with (
        pytest.raises(exc.DBAPIError) as raised,
        store_errors(url, "read"),
        engine.connect() as connection,
    ):
        connection.exec_driver_sql("SELEC 1")
    assert not isinstance(raised.value, StoreError)
    with (
        pytest.raises(exc.IntegrityError),
        store_errors(url, "write"),
        engine.begin() as connection,
    ):
        connection.execute(text("INSERT INTO kagura_events (name, at) VALUES (NULL, 1.0)"))
    with pytest.raises(KeyError), store_errors(url, "read"):
        raise KeyError("not a database error at all")


def test_a_store_error_names_the_store_and_the_first_line_of_the_cause() -> None:
    url = normalise_url(f"postgresql://kagura:{PASSWORD}@db.example:5432/kagura")
    driver_error = RuntimeError(f"server said: bad login for {PASSWORD}\nDETAIL: more")
    error = exc.OperationalError("SELECT 1", {}, driver_error)
    assert is_store_fault(error)
    assert str(store_error(url, "write the journal", error)) == (
        "event store postgresql://kagura:***@db.example:5432/kagura: cannot write the journal: "
        "server said: bad login for ***"
    )


@ON_POSTGRES
def test_reading_a_store_that_went_away_is_a_store_error(
    store_url: str, postgres_server: PostgresServer
) -> None:
    store = EventStore(store_url)
    assert store.get_executions() == []
    database = store_url.rsplit("/", 1)[1]
    postgres_server.admin(f"DROP DATABASE {database} WITH (FORCE)")
    with pytest.raises(StoreError) as raised:
        store.get_executions()
    assert f'database "{database}" does not exist' in str(raised.value)
    assert str(raised.value).startswith(f"event store {store_url}: cannot read: ")


# -- the recorder -------------------------------------------------------------------------------

CALLS = """
import asyncio
from kagura import agent

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

async def main() -> None:
    answers = [await summarise(f"doc {n}") for n in range(200)]
    assert all(f"doc {n}" in answer for n, answer in enumerate(answers)), answers[:3]
    print("200 calls answered")

asyncio.run(main())
"""


@dataclass(frozen=True)
class Fault:
    url: str
    run_as: list[str]  # the command prefix of a user the fault applies to
    name: str  # how messages name the store
    says: str  # part of the one warning


@pytest.fixture(params=["cannot be opened", "cannot be written"])
def fault(
    request: pytest.FixtureRequest,
    store_url: str,
    store_dir: Path,
    pg_role_if_postgres: Callable[[str], Role] | None,
) -> Fault:
    """A store the recorder cannot open (the store in a read-only directory; a PostgreSQL role
    that may not create the schema), or can open and not write (a read-only file in a directory
    its user may write, where SQLite makes its -wal and -shm files; a role that may only read)."""
    opens = request.param == "cannot be written"
    if pg_role_if_postgres is not None:
        if not opens:
            role = pg_role_if_postgres("")
            says = "cannot open: permission denied for schema public"
        else:
            engine_for(normalise_url(store_url))  # the schema, made by its owner
            role = pg_role_if_postgres(SELECT_ONLY)
            says = "cannot write: permission denied for table"
        return Fault(role.url, [], role.url.replace(PASSWORD, "***"), says)
    prefix: list[str] = request.getfixturevalue("unprivileged")
    path = store_dir / "events.db"
    made_by_a_run(str(path))
    if opens:
        read_only(store_dir, mode=0o777)
        says = "cannot write: attempt to write a readonly database"
    else:
        read_only(store_dir)
        says = (
            "cannot open: attempt to write a readonly database "
            f"(this user may not write in {store_dir})"
        )
    return Fault(str(path), prefix, str(path), says)


@pytest.fixture
def pg_role_if_postgres(
    store_url: str, request: pytest.FixtureRequest
) -> Callable[[str], Role] | None:
    if not is_postgres(store_url):
        return None
    make: Callable[[str], Role] = request.getfixturevalue("pg_role")
    return make


@pytest.mark.parametrize("process", ["1", "0"], ids=["writer process", "writer thread"])
def test_a_store_that_cannot_be_written_is_one_warning_and_never_affects_the_calls(
    fault: Fault, process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Said once: on the script's stderr, or, when the script handed its last rows to its
    writer process and left before the writer found the store unusable, in the writer's log
    (nobody reads the script's stderr any more: see observability/_writer_log.py)."""
    with tempfile.TemporaryDirectory() as home:
        Path(home).chmod(0o777)  # the unprivileged user's writer keeps its log there
        monkeypatch.setenv("KAGURA_HOME", home)
        env = {"KAGURA_DB": fault.url, "KAGURA_MODEL": "fake", "KAGURA_RECORD_PROCESS": process}
        result = run_as(fault.run_as, ["-c", CALLS], env)
        wait_for_writers(normalise_url(fault.url))
        log = Path(home) / LOG_NAME
        logged = log.read_text().splitlines() if log.exists() else []
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 calls answered\n"
    lines = result.stderr.splitlines() + logged
    assert len(lines) == 1, lines
    assert "kagura: " in lines[0], lines
    assert f"event store {fault.name}: {fault.says}" in lines[0]
    assert PASSWORD not in result.stderr + "".join(logged)


class Refusing:
    """Makes a writer's inserts fail as a full disk does, until told otherwise."""

    def __init__(self, writer: StoreWriter, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts = 0
        self.refusing = True
        insert = writer._insert

        def refused(*args: Any) -> None:
            self.attempts += 1
            if self.refusing:
                full = sqlite3.OperationalError("database or disk is full")
                full.sqlite_errorcode = 13  # type: ignore[attr-defined]
                raise exc.OperationalError("INSERT ...", {}, full)
            insert(*args)

        monkeypatch.setattr(writer, "_insert", refused)


def a_batch(span_id: str) -> tuple[list[Any], list[Any], list[Any]]:
    row = [span_id, span_id, None, "agent", "summarise", "k", None, "completed", 1, 2]
    row += [None, 0, 0, None, 0, 0, None, None, None, None, None, None]  # ..., attributes, agent
    assert len(row) == ROW_WIDTH
    return [], [tuple(row)], []


class Clock:
    """``time`` as the writer sees it: a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_writer_warns_once_drops_batches_quietly_and_tries_again_later(
    store_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kagura.recorder")
    clock = Clock()
    monkeypatch.setattr(_writer, "time", clock)
    writer = StoreWriter(normalise_url(store_url), "full")
    refusing = Refusing(writer, monkeypatch)
    for n in range(5):
        writer.write(*a_batch(f"lost-{n}"))
    # One attempt: until it is time to try again, batches are dropped untried.
    assert refusing.attempts == 1
    assert writer.failed_batches == 5
    (warning,) = caplog.messages
    assert warning.startswith(f"kagura: event store {engines.store_name(writer.url)}: cannot write")
    assert "database or disk is full" in warning

    clock.now += _writer.RETRY_S  # time to try again
    writer.write(*a_batch("lost-5"))
    writer.write(*a_batch("lost-6"))
    assert refusing.attempts == 2
    assert len(caplog.messages) == 1  # still failing: nothing more said
    refusing.refusing = False
    clock.now += _writer.RETRY_S
    writer.write(*a_batch("kept"))
    assert caplog.messages[-1].endswith("writing again (7 batches of recordings were dropped)")
    assert {row["span_id"] for row in rows(store_url)} == {"kept"}
    assert writer.failed_batches == 7


def test_a_writer_opened_before_its_database_exists_writes_once_it_does(
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service started beside its database may meet it not made yet (or its server not up):
    recording was then off for the process's whole life. It is tried again, as a store that
    cannot be written is."""
    caplog.set_level(logging.WARNING, logger="kagura.recorder")
    clock = Clock()
    monkeypatch.setattr(_writer, "time", clock)
    name = f"kagura_later_{os.getpid()}"
    url = normalise_url(postgres_server.url(name))
    writer = StoreWriter(url, "full")
    try:
        writer.write(*a_batch("lost-0"))
        (warning,) = caplog.messages
        assert warning.startswith(f"kagura: event store {engines.store_name(url)}: cannot open: ")
        assert f'database "{name}" does not exist' in warning
        assert warning.endswith(
            "recordings are dropped until it can be written (tried again every 30s)"
        )

        postgres_server.admin(f"CREATE DATABASE {name}")
        writer.write(*a_batch("lost-1"))  # not yet time to try again
        clock.now += _writer.RETRY_S
        writer.write(*a_batch("kept"))
        assert caplog.messages[-1].endswith("writing again (2 batches of recordings were dropped)")
        assert {row["span_id"] for row in rows(url)} == {"kept"}
        assert (writer.failed_batches, writer.written_spans) == (2, 1)
    finally:
        writer.dispose()
        _forget_engine(url)
        postgres_server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_writer_process_that_cannot_stage_warns_once(
    store_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:

    caplog.set_level(logging.WARNING, logger="kagura.recorder")
    writer = StoreWriter(normalise_url(store_url), "full")
    engine = writer.engine

    class Failing:
        """An engine whose every transaction fails as a read-only file does."""

        dialect = engine.dialect

        def begin(self) -> Any:
            readonly = sqlite3.OperationalError("attempt to write a readonly database")
            readonly.sqlite_errorcode = 8  # type: ignore[attr-defined]
            raise exc.OperationalError("INSERT ...", {}, readonly)

        connect = begin

    monkeypatch.setattr(writer, "engine", Failing())
    for n in range(3):
        running, finished, events = a_batch(f"batch-{n}")
        writer.write(running, finished, events)
    assert writer.failed_batches == 3
    assert len(caplog.messages) == 1
    assert "attempt to write a readonly database" in caplog.messages[0]


async def test_recording_stops_when_the_writer_process_dies_and_the_store_cannot_be_opened(
    record_to: Callable[..., Recorder],
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kagura import agent

    @agent
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    recorder = record_to(store_url, KAGURA_RECORD_PROCESS="1")
    with override_model(FakeModel()):
        assert await summarise("before") == "Summarise: before"
        assert recorder.flush()
        sidecar = recorder._writer
        assert isinstance(sidecar, _recorder._Sidecar)

        def unopenable(url: str, content: str) -> StoreWriter:
            raise StoreError(engines.store_name(url), "cannot open: it went away")

        monkeypatch.setattr(_recorder, "StoreWriter", unopenable)
        sidecar.process.kill()
        sidecar.process.wait(SUBPROCESS_TIMEOUT)
        assert await summarise("after") == "Summarise: after"
        assert recorder.flush() is False
        assert recorder.broken
        for n in range(50):
            assert await summarise(f"later {n}") == f"Summarise: later {n}"
    assert not recorder._rows and not recorder._open_spans  # nothing kept for nobody
    off = [m for m in caplog.messages if "recording is off" in m]
    assert off == [
        f"kagura: recording is off: event store {engines.store_name(recorder.url)}: "
        "cannot open: it went away"
    ]


# -- reading: kagura monitor and EventStore -----------------------------------------------------

MONITOR = ["-m", "kagura.cli", "monitor"]


def test_monitor_reads_a_store_in_a_read_only_directory(
    store_dir: Path, unprivileged: list[str]
) -> None:
    path = store_dir / "events.db"
    made_by_a_run(str(path))
    (agent_call,) = [
        e for e in EventStore(path).get_executions() if e["inputs"] == {"text": "doc 1"}
    ]
    _forget_engine(str(path))  # closed: SQLite removes its -wal and -shm files
    assert [p.name for p in store_dir.iterdir()] == ["events.db"]
    read_only(store_dir)
    listing = run_as(unprivileged, [*MONITOR, "list", "--db", str(path)], {"COLUMNS": "200"})
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count("summarise") == 3 and "3 shown" in listing.stdout
    assert listing.stderr == ""
    stats = run_as(unprivileged, [*MONITOR, "stats", "--db", str(path)], {"COLUMNS": "200"})
    assert stats.returncode == 0, stats.stderr
    assert "completed" in stats.stdout and "summarise" in stats.stdout
    trace = run_as(unprivileged, [*MONITOR, "trace", agent_call["id"], "--db", str(path)], {})
    assert trace.returncode == 0, trace.stderr
    assert "summarise" in trace.stdout and "fake" in trace.stdout
    # Nothing was written: no -wal or -shm file made.
    assert [p.name for p in store_dir.iterdir()] == ["events.db"]


DURABLE_RUN = """
import asyncio
from kagura import agent, workflow

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

@workflow(durable=True)
async def digest(text: str) -> str:
    return await summarise(text)

asyncio.run(digest.run("doc", run_id="the-run"))
"""


def test_runs_commands_read_a_journal_in_a_read_only_directory(
    store_dir: Path, unprivileged: list[str]
) -> None:
    path = store_dir / "events.db"
    made = run_script(DURABLE_RUN, {"KAGURA_DB": str(path), "KAGURA_MODEL": "fake"})
    assert made.returncode == 0, made.stderr
    wait_for_writers(normalise_url(path))
    read_only(store_dir)
    env = {"KAGURA_DB": str(path), "COLUMNS": "200"}
    listing = run_as(unprivileged, ["-m", "kagura.cli", "runs", "list"], env)
    assert listing.returncode == 0, listing.stderr
    assert "the-run" in listing.stdout and "completed" in listing.stdout
    shown = run_as(unprivileged, ["-m", "kagura.cli", "runs", "show", "the-run"], env)
    assert shown.returncode == 0, shown.stderr
    assert "digest/summarise#0" in shown.stdout
    # A command that writes says the store may not be written, in one line.
    pruned = run_as(unprivileged, ["-m", "kagura.cli", "runs", "prune", "--older-than", "1s"], env)
    assert pruned.returncode == 1
    assert pruned.stderr.startswith(f"kagura: error: event store {path}: ")
    assert "readonly database" in pruned.stderr and pruned.stderr.count("\n") == 1


def test_an_older_journal_in_a_read_only_directory_says_why_it_cannot_be_read(
    store_dir: Path, unprivileged: list[str]
) -> None:
    """A journal of schema version 6 has no lease column, and a process that may not write it
    cannot add one: it said only "no such column", as a bug would."""
    path = store_dir / "events.db"
    made = run_script(DURABLE_RUN, {"KAGURA_DB": str(path), "KAGURA_MODEL": "fake"})
    assert made.returncode == 0, made.stderr
    wait_for_writers(normalise_url(path))
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("ALTER TABLE kagura_runs DROP COLUMN lease_seconds")
        db.execute("UPDATE kagura_schema SET version = 6")
    read_only(store_dir)
    env = {"KAGURA_DB": str(path), "COLUMNS": "200"}
    listing = run_as(unprivileged, ["-m", "kagura.cli", "runs", "list"], env)
    assert listing.returncode == 1
    assert listing.stderr.startswith(f"kagura: error: event store {path}: cannot ")
    assert listing.stderr.count("\n") == 1, listing.stderr
    assert (
        "made by an older version of Kagura (schema version 6; this one reads "
        f"{engines.SCHEMA_VERSION}), and this process cannot write it to upgrade it"
    ) in listing.stderr
    # What it can read, it reads.
    calls = run_as(unprivileged, [*MONITOR, "list", "--db", str(path)], env)
    assert calls.returncode == 0, calls.stderr


def test_a_value_a_newer_store_refuses_is_not_blamed_on_its_version(store_url: str) -> None:
    url = normalise_url(store_url)
    with engines.engine_for(url).begin() as connection:
        connection.execute(engines.schema_version.update().values(version=99))
    _forget_engine(store_url)
    engine = engines.engine_for(url)  # left as it is: a newer version made it
    insert = (
        "INSERT INTO kagura_runs (run_id, workflow, status, created_at, updated_at, attempts) "
        "VALUES ('twice', 'wf', 'running', 0, 0, 1)"
    )
    with (
        pytest.raises(exc.IntegrityError),
        engines.store_errors(url, "write"),
        engine.begin() as connection,
    ):
        connection.exec_driver_sql(insert)
        connection.exec_driver_sql(insert)


READ_WHILE_WRITTEN = """
import sys
from kagura.observability import EventStore

store = EventStore(sys.argv[1])
print(sorted(e["name"] for e in store.get_executions(limit=None)))
"""


def test_a_store_in_a_read_only_directory_is_read_while_a_writer_has_it_open(
    store_dir: Path, unprivileged: list[str]
) -> None:
    path = store_dir / "events.db"
    made_by_a_run(str(path))
    url = normalise_url(path)
    # A writer (this process) with the store open, its latest row in the -wal file only.
    writer = StoreWriter(url, "full")
    try:
        running, finished, events = a_batch("in-the-wal")
        writer.write(running, [(*finished[0][:4], "written-late", *finished[0][5:])], events)
        assert (store_dir / "events.db-wal").stat().st_size > 0
        read_only(store_dir)
        result = run_as(unprivileged, ["-c", READ_WHILE_WRITTEN, str(path)], {})
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{['summarise'] * 3 + ['written-late']}\n"
    finally:
        _forget_engine(str(path))


def test_monitor_reports_a_store_that_cannot_be_opened_in_one_line(
    unopenable: Unopenable, capsys: pytest.CaptureFixture[str]
) -> None:
    from kagura.cli import main

    for command in (["list"], ["stats"], ["cost"], ["trace", "some-id"]):
        code = main(["monitor", *command, "--db", unopenable.url])
        out, err = capsys.readouterr()
        if unopenable.cause.startswith("cannot create its directory"):
            # A --db file that does not exist is not created: said before opening anything.
            assert (code, err) == (1, f"kagura: error: no event store at {unopenable.url}\n")
            continue
        if unopenable.cause == FOREIGN:
            assert (code, out) == (1, "")
            assert err == (
                f"kagura: error: {unopenable.url} is not a Kagura event store: it holds other "
                "tables (notes, users) and none of Kagura's; give --db (or KAGURA_DB) the file "
                "Kagura records to\n"
            )
            continue
        assert code == 1
        assert out == ""
        assert err.startswith(f"kagura: error: event store {unopenable.name}: cannot open: ")
        assert unopenable.cause in err
        assert err.count("\n") == 1
        assert PASSWORD not in err


@ON_POSTGRES
def test_a_role_that_may_only_read_reads_what_is_written(
    store_url: str, pg_role: Callable[[str], Role]
) -> None:
    writer = StoreWriter(normalise_url(store_url), "full")
    running, finished, events = a_batch("written")
    writer.write(running, finished, events)
    role = pg_role(SELECT_ONLY)
    executions = EventStore(role.url).get_executions()
    assert [e["id"] for e in executions] == ["written"]
    with pytest.raises(StoreError) as raised:
        EventStore(role.url).delete_older_than(0)
    assert "cannot delete old runs: permission denied for table" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_a_damaged_store_in_a_read_only_directory_is_one_line_too(
    store_dir: Path, unprivileged: list[str]
) -> None:
    path = store_dir / "events.db"
    path.write_bytes(bytes(range(256)) * 64)
    read_only(store_dir)
    result = run_as(unprivileged, [*MONITOR, "list", "--db", str(path)], {})
    assert result.returncode == 1
    assert (
        result.stderr == f"kagura: error: event store {path}: cannot open: file is not a database\n"
    )


def test_a_table_named_like_kagura_s_that_is_not_is_a_store_error(
    store_url: str, record_to: Callable[..., Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """Another program's ``kagura_spans``: making Kagura's indexes on it failed with
    SQLAlchemy's ProgrammingError, its SQL statement and all, instead of a StoreError; and the
    recorder called that a bug of its own."""
    url = normalise_url(store_url)
    engine = sqlalchemy_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE kagura_spans (id INTEGER, note TEXT)")
    finally:
        engine.dispose()
    with pytest.raises(StoreError) as raised:
        EventStore(store_url).get_executions()
    message = str(raised.value)
    assert message.startswith(f"event store {engines.store_name(url)}: cannot open: Kagura's ")
    assert "if tables named kagura_* there are another program's" in message
    assert "[SQL:" not in message
    _forget_engine(store_url)

    caplog.set_level(logging.WARNING, logger="kagura.recorder")
    recorder = record_to(store_url, KAGURA_RECORD_PROCESS="0")
    recorder.flush()
    off = [m for m in caplog.messages if "recording is off" in m]
    assert len(off) == 1 and "if tables named kagura_* there are another program's" in off[0]


@pytest.mark.parametrize(
    "url", ["mysql://app:pw@127.0.0.1/db", "postgresql+asyncpg://app:pw@127.0.0.1/db"]
)
def test_a_url_of_a_database_kagura_cannot_use_is_said_so(url: str) -> None:
    """The error said that a driver was missing: for PostgreSQL through another driver, to
    install the extra that was installed; for MySQL, as if it would work with its driver."""
    scheme = url.partition("://")[0]
    with pytest.raises(StoreError) as raised:
        EventStore(url).get_executions()
    assert str(raised.value) == (
        f"event store {scheme}://app:***@127.0.0.1/db: cannot open: Kagura stores in SQLite "
        f"or PostgreSQL, not {scheme}://: give a SQLite file's path or a postgresql:// URL"
    )
