"""Engines for the store: a SQLite file by default, PostgreSQL for ``postgresql://`` URLs.

SQLite runs in WAL mode with a generous busy timeout, so several processes can record into one
file (readers never block the writer, writers queue instead of failing with "database is locked").

A store that cannot be opened, read or written raises :class:`~kagura.errors.StoreError`, naming
the store and the cause (see :func:`store_errors`); the driver's exception is its ``__cause__``.

SQLAlchemy is imported when first needed, and its names are imported from the package
(``from sqlalchemy import make_url, exc``), never from a submodule first: Python makes a thread
that imports the package wait while another thread imports it, but not one that imports a
submodule, which then gets the package half made. The recorder's thread and the journal's met
so, and recording was turned off ("partially initialized module 'sqlalchemy.engine'").
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from .. import _settings
from ..errors import StoreError, UsageError
from ._migrations import SCHEMA_VERSION, upgrade, wait_for_an_upgrade

DEFAULT_DB_NAME = "events.db"

T = TypeVar("T")

_engines: dict[str, Any] = {}
#: SQLite engines that sync every commit (see synced_engine_for), by URL.
_synced_engines: dict[str, Any] = {}
_read_only_engines: dict[str, Any] = {}
_lock = threading.Lock()
_created: set[str] = set()
_POSTGRES_DRIVER = "postgresql+psycopg://"
#: How long a connection to a SQLite store waits for another's lock before it fails with
#: "database is locked" (SQLite's busy timeout), in seconds.
_BUSY_TIMEOUT_S = 60


def default_url() -> str:
    """``KAGURA_DB``, else ``KAGURA_HOME/events.db``, as a URL (read afresh: tests change them)."""
    return _default_url(_settings.event_store_url(), str(_settings.kagura_home()))


@lru_cache(maxsize=64)
def _default_url(explicit: str | None, home: str) -> str:
    # Cached per setting: resolving the path costs system calls on every durable run.
    if explicit:
        return normalise_url(explicit)
    return normalise_url(str(Path(home) / DEFAULT_DB_NAME))


def normalise_url(db_path_or_url: str | Path) -> str:
    """A SQLAlchemy URL from a path or a URL (``postgresql://`` uses the psycopg 3 driver)."""
    if not isinstance(db_path_or_url, str | os.PathLike):
        raise UsageError(
            f"an event store is a SQLite file's path or a postgresql:// URL, got {db_path_or_url!r}"
        )
    text = str(db_path_or_url)
    if text.startswith(("postgresql://", "postgres://")):
        return _POSTGRES_DRIVER + text.split("://", 1)[1]
    if "://" in text:
        if text.startswith("sqlite") and text not in _said_relative:
            _say_if_relative(text)
        return text
    path = Path(text).expanduser().resolve()
    return f"sqlite:///{path}"


#: SQLite URLs whose relative path has been pointed out (once per process each).
_said_relative: set[str] = set()


def _say_if_relative(url: str) -> None:
    """Warn that a SQLite URL names a path relative to the current directory: with three
    slashes, ``sqlite:///tmp/events.db`` is ``./tmp/events.db``, not ``/tmp/events.db``, and a
    store made there is not found from anywhere else. (A plain path means what it says.)"""
    _said_relative.add(url)
    scheme, _, rest = url.partition(":///")
    path = rest.split("?", 1)[0]
    if not rest or not path or path == ":memory:" or path.startswith("file:"):
        return
    if not os.path.isabs(path):
        warnings.warn(
            f"the store {url} is the file {os.path.abspath(path)}, under the current directory "
            f"(a SQLite URL's three slashes start a relative path): for /{path}, write "
            f"{scheme}:////{path} or the path itself",
            UserWarning,
            stacklevel=4,
        )


#: Query parameters that carry a password (libpq takes ``?password=`` as well as ``user:pw@``).
_SECRET_PARAMETERS = ("password", "sslpassword")


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    hidden = {name: "***" for name in _SECRET_PARAMETERS if name in parsed.query}
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True)


def _passwords(url: str) -> list[str]:
    from sqlalchemy import make_url

    parsed = make_url(url)
    found: list[str] = [str(parsed.password)] if parsed.password else []
    for name in _SECRET_PARAMETERS:
        value = parsed.query.get(name, ())
        found.extend([value] if isinstance(value, str) else value)
    return [password for password in found if password]


def store_name(url: str) -> str:
    """How messages name the store at ``url``: a SQLite file's path, else the URL without its
    password (``postgresql://`` as the user wrote it, without the driver we add)."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") :] or url
    try:
        name = redact_url(url)
    except Exception:  # not even a URL SQLAlchemy can parse: say nothing that may hold a secret
        return url.split("://", 1)[0] + "://..."
    if name.startswith(_POSTGRES_DRIVER):
        name = "postgresql://" + name[len(_POSTGRES_DRIVER) :]
    return name


def scrub_url(text: str, url: str) -> str:
    """``text`` with the URL's password (if any) masked: messages never show it."""
    try:
        passwords = _passwords(url)
    except Exception:
        return text
    for password in passwords:
        for form in {password, quote(password, safe="")}:
            text = text.replace(form, "***")
    return text


# SQLite's primary result codes that blame the store, not the statement: PERM, BUSY, LOCKED,
# NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, AUTH, NOTADB. Its generic ERROR (a
# syntax error, "no such table") and its misuse codes are the code's.
_SQLITE_FAULTS = frozenset({3, 5, 6, 7, 8, 10, 11, 13, 14, 15, 23, 26})
# PostgreSQL's SQLSTATE classes that blame the store: connection exception, invalid
# authorization, invalid catalog name (no such database), insufficient resources (a full disk),
# operator intervention (a server shutting down), system error, internal error (data corrupted).
_POSTGRES_FAULTS = frozenset({"08", "28", "3D", "53", "57", "58", "XX"})
# And two single ones: insufficient_privilege (a role that may read but not write, say) and
# read_only_sql_transaction (a standby server).
_POSTGRES_FAULT_STATES = frozenset({"42501", "25006"})


def is_store_fault(error: BaseException) -> bool:
    """Whether ``error``, raised by a database call, is the store's fault rather than the
    code's: the store cannot be reached, opened, read or written (permissions, a damaged file, a
    full disk, a lost connection, a server that refuses the login). Programming errors (bad SQL,
    a violated constraint, a value the database refuses) are not: they are bugs, and keep their
    own type and traceback."""
    from sqlalchemy import exc

    if not isinstance(error, exc.DBAPIError):
        return False
    orig = error.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_FAULTS
    if type(orig).__module__.split(".")[0] == "sqlite3":
        return False  # raised by Python's sqlite3 module itself: misused
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate in _POSTGRES_FAULT_STATES or sqlstate[:2] in _POSTGRES_FAULTS
    # No code from the server (a connection that failed or broke), or another driver: by the
    # DB-API's classes. Its base class, on its own, is what a damaged file raises. And whatever
    # the driver raised while connecting, with no statement under way: a URL's parameter it
    # refused (psycopg's ProgrammingError for ``?connect_timeout=abc``).
    return (
        isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.InternalError))
        or type(error) is exc.DatabaseError
        or error.statement is None
    )


#: PostgreSQL's SQLSTATE classes of a server that may well be there later: connection exception,
#: invalid catalog name (a database not made yet), insufficient resources (too many
#: connections), operator intervention (a server starting up or shutting down).
_POSTGRES_PASSING = frozenset({"08", "3D", "53", "57"})


def may_come_back(error: BaseException | None) -> bool:
    """Whether ``error``, raised while opening the store, is a PostgreSQL server that is not
    there yet, or a database not made yet: what a service started beside its database meets,
    and what passes. A SQLite file that cannot be opened (a directory that cannot be written, a
    damaged file) does not pass on its own, nor does a login refused."""
    from sqlalchemy import exc

    if not isinstance(error, exc.DBAPIError) or not is_store_fault(error):
        return False
    orig = error.orig
    if getattr(orig, "sqlite_errorcode", None) is not None:
        return False
    if type(orig).__module__.split(".")[0] == "sqlite3":
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate[:2] in _POSTGRES_PASSING
    return isinstance(error, exc.OperationalError)  # no answer: refused, unreachable, timed out


#: SQLSTATEs of a transaction PostgreSQL rolled back for another's sake: a serialisation
#: failure, a deadlock.
_CONFLICT_STATES = frozenset({"40001", "40P01"})


def lost_to_another(error: BaseException) -> bool:
    """Whether a database call failed because another transaction held what it needed (a
    deadlock, a serialisation failure). Its transaction was rolled back whole, and running it
    again is the remedy PostgreSQL documents. (SQLite waits for its lock instead, up to the
    busy timeout.)"""
    from sqlalchemy import exc

    orig = getattr(error, "orig", None)
    return isinstance(error, exc.DBAPIError) and getattr(orig, "sqlstate", None) in (
        _CONFLICT_STATES
    )


def refused_values(error: BaseException) -> bool:
    """Whether the database refused a statement for the values it held: one longer than its
    column or out of its type's range, a NUL character in text (PostgreSQL takes none of
    these; SQLite all), a missing value. Running it again with other values may succeed."""
    from sqlalchemy import exc

    return isinstance(error, (exc.DataError, exc.IntegrityError))


#: How many times :func:`transaction` runs a transaction that loses to another (in all).
_ATTEMPTS = 5


def transaction(engine: Any, work: Callable[[Any], T], *, synced: bool = True) -> T:
    """``work(connection)`` in a transaction of its own, committed; run again when PostgreSQL
    rolls the transaction back for another's sake (see :func:`lost_to_another`), up to
    ``_ATTEMPTS`` times in all. ``work`` must do nothing but database calls, since it may run
    more than once. Any other error, or the last one, is raised.

    With ``synced=False`` the commit returns before it is on disk, where the engine would
    otherwise wait for that (see :func:`synced_engine_for`): for writes a power cut may lose.
    Other connections see it at once, a killed process does not lose it, and the next synced
    commit to the database takes it to disk with its own (a database's log is written in
    order).

    A SQLite store that stayed locked for the whole busy timeout because another process is
    upgrading it (which may take minutes) is waited for until the upgrade is done, and the
    transaction runs again then: see :func:`~._migrations.wait_for_an_upgrade`."""
    attempt = 1
    while True:
        try:
            with engine.begin() as connection:
                if not synced:
                    _unsynced(connection)
                return work(connection)
        except Exception as error:
            if _busy(error) and wait_for_an_upgrade(engine):
                continue
            if attempt == _ATTEMPTS or not lost_to_another(error):
                raise
            attempt += 1


def _busy(error: BaseException) -> bool:
    """Whether ``error`` is SQLite's "database is locked" (its busy timeout ran out)."""
    code = getattr(getattr(error, "orig", None), "sqlite_errorcode", None)
    return code is not None and code & 0xFF == 5  # SQLITE_BUSY


def _unsynced(connection: Any) -> None:
    """Let the transaction begun on ``connection`` commit without waiting for the disk."""
    name = connection.dialect.name
    if name == "postgresql":
        # For this transaction only (PostgreSQL's own remedy for writes that may be lost).
        connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
    elif name == "sqlite" and connection.info.get("synced"):
        # A setting of the connection, not of the transaction: the synced engine sets it back
        # when the connection returns to its pool (see synced_engine_for).
        connection.exec_driver_sql("PRAGMA synchronous=NORMAL")
        connection.info["unsynced"] = True


def store_error(url: str, doing: str, error: BaseException) -> StoreError:
    """A :class:`~kagura.errors.StoreError` for ``error``, raised while ``doing`` something
    with the store at ``url`` ("open", "read", "write the journal"): it reads ``event store
    <name>: cannot <doing>: <cause>``, naming the store and the cause, never the password. Raise
    it ``from error``."""
    return StoreError(store_name(url), f"cannot {doing}: {scrub_url(_cause(url, error), url)}")


@contextmanager
def store_errors(url: str, doing: str) -> Iterator[None]:
    """Run the block's database calls on the store at ``url``, raising a
    :class:`~kagura.errors.StoreError` (see :func:`store_error`) for a store fault (see
    :func:`is_store_fault`); anything else, a :class:`StoreError` included, goes through as it
    is."""
    try:
        yield
    except StoreError:
        raise
    except Exception as error:
        other = _other_versions.get(url)
        if other is not None and _schema_mismatch(error):
            raise _versions_differ(url, doing, error, other) from error
        if not is_store_fault(error):
            raise
        raise store_error(url, doing, error) from error


def _schema_mismatch(error: BaseException) -> bool:
    """Whether ``error`` says a table or a column this code reads is not there."""
    from sqlalchemy import exc

    if not isinstance(error, exc.DBAPIError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in ("42703", "42P01")  # undefined column, undefined table
    text = str(error.orig)
    return text.startswith(("no such column", "no such table")) or "has no column named" in text


def _versions_differ(url: str, doing: str, error: BaseException, other: int) -> StoreError:
    cause = scrub_url(_cause(url, error), url)
    if other > SCHEMA_VERSION:
        # Left as it is when opened (a newer version only adds, as a rule): but this one
        # changed what this code reads.
        why = (
            f"the store was made by a newer version of Kagura (schema version {other}; this "
            f"one knows up to {SCHEMA_VERSION}): upgrade kagura to use it"
        )
    else:
        why = (
            f"the store was made by an older version of Kagura (schema version {other}; this "
            f"one reads {SCHEMA_VERSION}), and this process cannot write it to upgrade it: run "
            "Kagura once where the store can be written (any agent call or kagura command)"
        )
    return StoreError(store_name(url), f"cannot {doing}: {cause}; {why}")


#: Stores whose schema version is not this code's, by URL: a newer one (left as it is), or an
#: older one this process may only read (it cannot upgrade it). Errors that say a table or a
#: column is missing say which.
_other_versions: dict[str, int] = {}


def _cause(url: str, error: BaseException) -> str:
    from sqlalchemy import exc

    orig = getattr(error, "orig", None)
    if isinstance(error, exc.DBAPIError) and orig is not None:
        # The driver's message says it all; SQLAlchemy's adds the statement and a link.
        text = str(orig)
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror + (f": {error.filename}" if error.filename else "")
    else:
        text = f"{type(error).__name__}: {error}"
    lines = text.strip().splitlines()
    cause = lines[0].strip() if lines else type(error).__name__
    path = sqlite_path(url)
    # SQLite's primary result codes CANTOPEN, READONLY and PERM: a file or directory this
    # user may not use, said tersely.
    if path is not None and (getattr(orig, "sqlite_errorcode", None) or 0) & 0xFF in (14, 8, 3):
        hint = _sqlite_hint(path)
        if hint:
            cause = f"{cause} ({hint})"
    return cause


def _sqlite_hint(path: str) -> str:
    """What SQLite's terse "unable to open database file" or "attempt to write a readonly
    database" most likely means for the file at ``path``."""
    file = Path(path)
    if file.is_dir():
        return "it is a directory"
    if not os.access(file.parent, os.W_OK | os.X_OK):
        # SQLite makes its -wal and -shm files beside the database.
        return f"this user may not write in {file.parent}"
    if file.exists() and not os.access(file, os.W_OK):
        return "this user may not write the file"
    if file.exists() and not os.access(file, os.R_OK):
        return "this user may not read the file"
    return ""


def sqlite_path(url: str) -> str | None:
    """The file behind a SQLite URL (``None`` for other databases, in-memory and URI ones)."""
    if not url.startswith("sqlite"):
        return None
    try:
        from sqlalchemy import make_url

        database = make_url(url).database
    except Exception:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database


def can_write(url: str) -> bool:
    """Whether this process may write the store at ``url``, as far as can be told without
    opening it: ``False`` for a SQLite file that exists where this user may not write it, or may
    not write its directory (where SQLite makes its -wal and -shm files). ``True`` for other
    databases: their server decides, query by query."""
    path = sqlite_path(url)
    if path is None or not os.path.exists(path):
        return True
    return os.access(path, os.W_OK) and os.access(os.path.dirname(path), os.W_OK | os.X_OK)


def engine_for(url: str, *, read_only: bool = False) -> Any:
    """The shared engine for ``url``, with the schema created (or upgraded: see
    :mod:`._migrations`) on first use in this process: the first connection to the store is
    made here, so a store that cannot be opened raises
    :class:`~kagura.errors.StoreError` here.

    ``read_only`` (a SQLite file this process may not write: see :func:`can_write`): an engine
    that never writes, not even the schema. Its queries see the tables as the writers left them;
    a store made by an older version, with columns or tables missing, fails to be read."""
    if read_only and sqlite_path(url) is not None:
        return _read_only_engine(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create(url)
        if url not in _created:
            from sqlalchemy import exc

            _refuse_foreign(url)
            with store_errors(url, "open"):
                try:
                    found = upgrade(engine, store_name(url))
                except exc.DBAPIError as error:
                    if is_store_fault(error):
                        raise
                    raise _not_ours(url, error) from error
            if found > SCHEMA_VERSION:
                _other_versions[url] = found
            _created.add(url)
        return engine


def _not_ours(url: str, error: BaseException) -> StoreError:
    """Making or upgrading Kagura's tables failed, and not for the store's sake: a table of the
    same name that is not Kagura's (another program's ``kagura_spans``, say), most likely."""
    return StoreError(
        store_name(url),
        f"cannot open: Kagura's tables could not be made or upgraded "
        f"({scrub_url(_cause(url, error), url)}); if tables named kagura_* there are another "
        f"program's, give Kagura a database (or a file) of its own",
    )


def foreign_tables(url: str) -> list[str]:
    """The tables of the SQLite file behind ``url``, if it holds some and none of Kagura's:
    another program's database, given as the store by mistake. Empty for a file that is not
    there yet, for other databases (sharing a PostgreSQL database is usual; Kagura's tables are
    named apart), and for a file this cannot read (opening the store says what is wrong)."""
    if sqlite_path(url) is None:
        return []
    names = table_names(url) or []
    if any(name.startswith("kagura_") for name in names):
        return []
    return [name for name in names if not name.startswith("sqlite_")]


def holds_no_store(url: str) -> bool:
    """Whether the database behind ``url`` is there and holds none of Kagura's tables: an
    empty SQLite file, or a PostgreSQL database nothing has recorded to. Commands that only
    read say so, rather than make Kagura's tables in it. ``False`` where it cannot be read:
    opening it says why."""
    names = table_names(url)
    return names is not None and not any(name.startswith("kagura_") for name in names)


def table_names(url: str) -> list[str] | None:
    """The tables of the database behind ``url``, read without making or changing anything;
    ``None`` for a SQLite file that is not there, or a database that cannot be read."""
    path = sqlite_path(url)
    if path is not None:
        if not os.path.isfile(path):
            return None
        import sqlite3

        try:
            # Read-only, and apart from the engine, whose first connection puts the file in
            # WAL mode: a file that is refused is left as it was.
            uri = f"{Path(path).absolute().as_uri()}?mode=ro"
            with closing(sqlite3.connect(uri, uri=True)) as db:
                query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                return [row[0] for row in db.execute(query)]
        except sqlite3.Error:
            return None
    from sqlalchemy import inspect

    try:
        engine = _create(url)  # not the shared engine: that one makes the schema
    except StoreError:
        return None
    try:
        return sorted(inspect(engine).get_table_names())
    except Exception:  # unreachable, refused: opening the store says why
        return None
    finally:
        engine.dispose()


def _refuse_foreign(url: str) -> None:
    """Another program's SQLite database is refused before any of Kagura's tables go into it."""
    foreign = foreign_tables(url)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise StoreError(
            store_name(url),
            f"cannot open: the file is another program's database, not a Kagura store (it "
            f"holds other tables, {shown}, and none of Kagura's); give Kagura a file of its "
            f"own (KAGURA_DB, or the store's path)",
        )


#: The URL schemes of the stores Kagura can use (``postgresql://`` is made the first).
_SCHEMES = frozenset({"sqlite", "sqlite+pysqlite", _POSTGRES_DRIVER.partition("://")[0]})


def _create(url: str) -> Any:
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    scheme = url.partition("://")[0]
    if scheme and "://" in url and scheme not in _SCHEMES:
        # SQLAlchemy would try its dialect for it, and say only that a driver is missing.
        raise StoreError(
            store_name(url),
            f"cannot open: Kagura stores in SQLite or PostgreSQL, not {scheme}://: give a SQLite "
            "file's path or a postgresql:// URL",
        )
    try:
        if url.startswith("sqlite"):
            path = sqlite_path(url)
            if path is not None:
                _make_directory(url, Path(path).parent)
            engine = create_engine(
                url, connect_args={"timeout": _BUSY_TIMEOUT_S, "check_same_thread": False}
            )
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except ImportError as error:  # the dialect imports its driver here
        if url.startswith("postgres"):
            reason = "the PostgreSQL driver is not installed: pip install 'kagura[postgres]'"
        else:
            reason = f"its database driver is not installed ({error})"
        raise StoreError(store_name(url), f"cannot open: {reason}") from error
    except (ArgumentError, ValueError, NoSuchModuleError) as error:  # no URL, no dialect for it
        cause = scrub_url(_cause(url, error), url)
        raise StoreError(
            store_name(url),
            f"cannot open: {cause} (a store is a SQLite file's path or a postgresql:// URL)",
        ) from error
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
        # A checkpoint copies the WAL's pages into the database and syncs it. At SQLite's
        # default (every 1,000 pages) the recorder's inserts paid ~1.5 µs a row for them
        # (measured); ten times rarer, a page the index inserts keep touching is copied once
        # per checkpoint rather than many times. The WAL grows to about 40 MB before one.
        cursor.execute("PRAGMA wal_autocheckpoint=10000")
        # A checkpoint cannot reach the WAL's end while a reader holds an older snapshot (a
        # `kagura monitor live` reading the store, say): the WAL grows past those 40 MB
        # meanwhile, and SQLite reuses the file from its start afterwards rather than shrink it.
        # A process recording for days kept every high-water mark (64 MB after 190k calls).
        cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        cursor.close()

    return engine


#: Bytes a SQLite store's WAL file is cut back to once a checkpoint has emptied it.
WAL_SIZE_LIMIT = 48 * 1024 * 1024


def _switch_to_wal(cursor: Any) -> None:
    """Put the store in WAL mode (the file keeps it), waiting for another connection's lock as
    long as the busy timeout would.

    The busy timeout does not cover it. A new store is in rollback mode until a first
    connection switches it, and switching reads the file, then writes it. When two processes
    switch at once, each holds a read lock and wants the write lock: SQLite refuses one of them
    at once ("database is locked") rather than wait, since each would wait for the other. The
    one refused lets go of its read lock, so the other switches; tried again, it finds the store
    in WAL mode, with nothing left to write. Seen with two writer processes opening a new store
    together, a forked child's and its parent's: the child's recording was turned off, and its
    calls were not recorded."""
    import sqlite3

    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            busy = error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
        _wait_for_the_lock(pause)
        pause = min(2 * pause, 0.1)


def _wait_for_the_lock(seconds: float) -> None:
    """Between two tries of :func:`_switch_to_wal` (tests replace it)."""
    time.sleep(seconds)


def _make_directory(url: str, directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        # mkdir says "File exists" or "Not a directory" when a file stands in the way: name it.
        blocking = next((p for p in (directory, *directory.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            reason = f"{blocking} is not a directory"
        else:
            reason = _cause(url, error)
        raise StoreError(
            store_name(url), f"cannot create its directory {directory}: {reason}"
        ) from error


def _read_only_engine(url: str) -> Any:
    """An engine that opens the SQLite file at ``url`` read-only (``mode=ro``).

    A WAL database is read through its -shm file, which SQLite makes when it is missing: in a
    directory this user may not write, it cannot, and the database is opened ``immutable``
    instead (SQLite's documented way to read it: https://www.sqlite.org/wal.html, "Read-Only
    Databases"). Immutable, SQLite ignores any -wal file and assumes nothing changes the file
    meanwhile: it is chosen only when there is no -wal file, i.e. no process is writing (every
    committed row is in the database file). A writer that starts while this reads may make a
    query fail, or miss its latest rows."""
    with _lock:
        engine = _read_only_engines.get(url)
        if engine is None:
            engine = _read_only_engines[url] = _create_read_only(url)
            version = _read_version(url, engine)
            if version is not None and version != SCHEMA_VERSION:
                _other_versions[url] = version
        return engine


def _read_version(url: str, engine: Any) -> int | None:
    """The schema version of the store behind ``engine``; ``None`` if it cannot be read (the
    first query says why)."""
    from ._migrations import stored_version

    try:
        with engine.connect() as connection:
            return stored_version(connection)
    except Exception:
        return None


def _create_read_only(url: str) -> Any:
    import sqlite3

    from sqlalchemy import QueuePool, create_engine

    path = sqlite_path(url)
    assert path is not None

    def engine_on(uri: str) -> Any:
        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)

        # A creator, not a URL: the path is quoted as SQLite's URIs want it. The pool made
        # explicit: for "sqlite://" SQLAlchemy would pick the in-memory database's.
        engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
        try:
            with store_errors(url, "open"), engine.connect() as connection:
                connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").all()
        except BaseException:
            engine.dispose()
            raise
        return engine

    file = "file:" + quote(path)
    try:
        return engine_on(f"{file}?mode=ro")
    except StoreError:
        if os.path.exists(path + "-wal"):
            raise
        return engine_on(f"{file}?mode=ro&immutable=1")


def synced_engine_for(url: str) -> Any:
    """:func:`engine_for`, with each commit on disk before it returns: for writes that must
    survive the machine going down, not only the process (the durable journal's). A SQLite store
    in WAL mode at ``synchronous=NORMAL`` (the recorder's setting, for speed) syncs only at
    checkpoints, so a commit it returned from survives a killed process but not a power loss;
    this engine's connections sync every commit (``FULL``). Other databases sync commits as
    their server is configured to (PostgreSQL: by default, every commit)."""
    engine = engine_for(url)  # the schema, and the store's faults, as every user gets them
    if sqlite_path(url) is None:
        return engine
    with _lock:
        synced = _synced_engines.get(url)
        if synced is None:
            from sqlalchemy import event

            synced = _synced_engines[url] = _create(url)

            @event.listens_for(synced, "connect")
            def _sync_every_commit(dbapi_connection: Any, record: Any) -> None:
                dbapi_connection.execute("PRAGMA synchronous=FULL")  # after _create's NORMAL
                record.info["synced"] = True

            @event.listens_for(synced, "checkin")
            def _sync_again(dbapi_connection: Any, record: Any) -> None:
                # After a transaction(synced=False): the next user of the connection syncs.
                if record.info.pop("unsynced", False) and dbapi_connection is not None:
                    dbapi_connection.execute("PRAGMA synchronous=FULL")

        return synced


def forget(url: str) -> None:
    """Close this process's engines for ``url`` and forget them (its schema is checked again
    by the next user): so that its database can be dropped, or its file removed."""
    with _lock:
        engines = [
            registry.pop(url, None) for registry in (_engines, _read_only_engines, _synced_engines)
        ]
        _created.discard(url)
        _other_versions.pop(url, None)
    for engine in engines:
        if engine is not None:
            engine.dispose()


def dispose_all() -> None:
    with _lock:
        for engine in [
            *_engines.values(),
            *_read_only_engines.values(),
            *_synced_engines.values(),
        ]:
            engine.dispose()
        _engines.clear()
        _read_only_engines.clear()
        _synced_engines.clear()
        _created.clear()


def use_a_large_page_cache(engine: Any) -> None:
    """Give the engine's SQLite connections a 64 MiB page cache (an upper bound, not an
    allocation). For the writer process only, which is the engine's only user there: SQLite's
    default of 2 MiB holds too little of a growing store's five B-trees, and the writer spent
    14% of its time reading pages back from the OS (profiled under load). Not for readers: a
    large cache slows the scans of ``kagura monitor stats`` (measured over 1M calls: 8.1 s
    against 5.7 s)."""
    if engine.dialect.name != "sqlite":
        return
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _page_cache(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA cache_size=-65536")

    engine.dispose()  # connections made before this are made again, with it
