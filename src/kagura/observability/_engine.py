"""Engines for the event store: a SQLite file by default, PostgreSQL for ``postgresql://`` URLs.

SQLite runs in WAL mode with a generous busy timeout, so several processes can record into one
file (readers never block the writer, writers queue instead of failing with "database is locked").
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import _settings
from ..errors import StoreError

DEFAULT_DB_NAME = "events.db"

_engines: dict[str, Any] = {}
_lock = threading.Lock()
_created: set[str] = set()


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
    text = str(db_path_or_url)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    return f"sqlite:///{path}"


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def store_name(url: str) -> str:
    """How messages name the store at ``url``: a SQLite file's path, else the URL without its
    password."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") :] or url
    try:
        return redact_url(url)
    except Exception:  # not even a URL SQLAlchemy can parse: say nothing that may hold a secret
        return url.split("://", 1)[0] + "://..."


def scrub_url(text: str, url: str) -> str:
    """``text`` with the URL's password (if any) masked: messages never show it."""
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        return text
    if not password:
        return text
    from urllib.parse import quote

    for form in {str(password), quote(str(password), safe="")}:
        text = text.replace(form, "***")
    return text


def store_error(url: str, doing: str, error: BaseException) -> StoreError:
    """A :class:`~kagura.errors.StoreError` for ``error``, raised while ``doing`` something
    with the store at ``url``: names the store and the cause, never the password. Raise it
    ``from error``."""
    lines = str(error).strip().splitlines()
    # SQLAlchemy appends the statement and a link to its docs: the first line is the cause.
    cause = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return StoreError(store_name(url), f"cannot {doing}: {scrub_url(cause, url)}")


def engine_for(url: str) -> Any:
    """The shared engine for ``url``, with the schema created on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create(url)
        if url not in _created:
            _create_schema(engine)
            _created.add(url)
        return engine


def _create(url: str) -> Any:
    from sqlalchemy import create_engine, event

    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            # A checkpoint copies the WAL's pages into the database and syncs it. At SQLite's
            # default (every 1,000 pages) the recorder's inserts paid ~1.5 µs a row for them
            # (measured); ten times rarer, a page the index inserts keep touching is copied once
            # per checkpoint rather than many times. The WAL grows to about 40 MB before one.
            cursor.execute("PRAGMA wal_autocheckpoint=10000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _create_schema(engine: Any) -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    from ._schema import metadata

    # Processes may create the schema at the same moment: a CREATE fails because another process
    # has just made that table or index, and the next checkfirst pass skips it. Every failure
    # means someone else made progress, so the attempts are bounded by the schema's size (times
    # a few racing processes).
    attempts = 4 * sum(1 + len(table.indexes) for table in metadata.sorted_tables)
    for attempt in range(attempts):
        try:
            metadata.create_all(engine, checkfirst=True)
            _add_missing_columns(engine)
            _update_indexes(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == attempts - 1:
                raise


def _add_missing_columns(engine: Any) -> None:
    """Columns added to a table after a store was created (a store outlives versions)."""
    from sqlalchemy import inspect

    from ._schema import metadata

    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    connection.exec_driver_sql(
                        f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"
                    )


def _update_indexes(engine: Any) -> None:
    """Indexes as this version wants them on a store an earlier version made: those no query
    uses any more dropped (each slows every insert), new ones made (``create_all`` adds the
    indexes of new tables only). Making one on a large store takes a few seconds, once."""
    from sqlalchemy import inspect

    from ._schema import RETIRED_INDEXES, metadata

    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            # Looked up first: on PostgreSQL a DROP would lock the table even where there is
            # nothing to drop, and every process opening the store passes here.
            present = {index["name"] for index in inspector.get_indexes(table.name)}
            for name in RETIRED_INDEXES:
                if name in present:
                    connection.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
            for index in table.indexes:
                if index.name not in present:
                    index.create(connection, checkfirst=True)


def dispose_all() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
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
