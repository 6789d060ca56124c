"""Migrations: a store made by an older version is brought up to this version's schema on open.

One mechanism, a version table: ``kagura_schema`` holds one row, the number of the last step in
:data:`STEPS` the store has had. Opening a store (:func:`upgrade`, called by ``engine_for`` once
per process and store) reads that number, one query, and runs the steps after it in order, each
in its own transaction, recording its number as it commits. A store without the table is at 0:
either new, or made by a version before the table existed (Kagura 0.x up to the schema of
commit cf3ef53), and step 1 brings both to that schema. A new store has all the steps in one
transaction: a process opening it meanwhile finds nothing or all of it.

Processes opening a store at the same moment take the steps one at a time: each step's
transaction first takes the store's lock for upgrades and reads the version again under it (see
:func:`_locked_version`), so a step is taken once. A process that finds another upgrading waits
for it however long the steps take, and says so (see :func:`_one_upgrader`). Every step is
idempotent all the same: it may find its change already made (``create_all`` of a newer schema
makes new tables whole; an earlier version of Kagura, which took no lock, may be opening the
same store), and then does nothing. A step that fails with "already exists" lost a race to one
of those: it is tried again (see :func:`upgrade`).

Why not Alembic: it would be a dependency for a handful of steps, and a store is opened on an
agent's first call, which must stay fast; importing Alembic and running its environment costs
more than the whole of this module's check (one ``SELECT``). Its autogenerate and branching
serve applications with many hand-written migrations, not a library with a small fixed schema.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

#: The schema version this code writes and reads: the number of the last step.
SCHEMA_VERSION = 7

_log = logging.getLogger("kagura.storage")


def _step_1_baseline(connection: Any) -> None:
    """The schema of commit cf3ef53, for a new store or one made before versions were kept:
    tables and indexes created, columns added to tables made before those columns existed,
    indexes no query uses any more dropped."""
    from sqlalchemy import inspect
    from sqlalchemy.schema import CreateColumn

    from ._schema import RETIRED_INDEXES, metadata

    metadata.create_all(connection, checkfirst=True)
    inspector = inspect(connection)
    dialect = connection.dialect
    preparer = dialect.identifier_preparer
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                # SQLAlchemy Core has no ALTER TABLE; the column's DDL is its own compiler's.
                definition = CreateColumn(column).compile(dialect=dialect)
                connection.exec_driver_sql(
                    f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {definition}"
                )
        # Looked up first: on PostgreSQL a DROP would lock the table even where there is
        # nothing to drop.
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for name in RETIRED_INDEXES:
            if name in indexes:
                connection.exec_driver_sql(f"DROP INDEX IF EXISTS {preparer.quote(name)}")
        for index in table.indexes:
            if index.name not in indexes:  # create_all makes the indexes of new tables only
                index.create(connection, checkfirst=True)


def _step_2_no_staging(connection: Any) -> None:
    """``kagura_staged`` retired: the recorder's writer no longer stages batches for readers to
    write in (see :mod:`kagura.observability._recorder`). Batches an earlier version left there
    (its writer process killed in a burst) are written into the spans and events tables first,
    then the table is dropped."""
    import marshal

    from sqlalchemy import inspect

    if not inspect(connection).has_table("kagura_staged"):
        return
    batches = connection.exec_driver_sql("SELECT id, batch FROM kagura_staged ORDER BY id").all()
    for batch_id, batch in batches:
        try:
            spans, events = _staged_rows(marshal.loads(batch))
        except Exception:  # damaged: the earlier version would have dropped it too
            _log.warning(
                "kagura: a batch of recordings staged by an earlier version (%s) cannot be "
                "read; it is dropped",
                batch_id,
            )
            continue
        _write_staged(connection, spans, events)
    connection.exec_driver_sql("DROP TABLE kagura_staged")


def _step_3_rollups(connection: Any) -> None:
    """Rollups (see _rollups): the rollup tables, the spans' ``agent`` column, the index of
    interrupted spans and the latency index (in place of the one before it) made; each LLM
    attempt's and tool call's agent filled in from its parent; then the rollups built from every
    span. It reads the whole store once: about 25 s per million agent calls on SQLite or
    PostgreSQL (``benchmarks/bench_queries.py``)."""
    from sqlalchemy import and_, select

    from ._rollups import rebuild_rollups
    from ._schema import spans

    _step_1_baseline(connection)  # the new tables, column and index, as for a new store
    parent = spans.alias("parent")
    agent_of_parent = (
        select(parent.c.name)
        .where(parent.c.span_id == spans.c.parent_id, parent.c.kind == "agent")
        .scalar_subquery()
    )
    connection.execute(
        spans.update()
        .where(
            and_(spans.c.agent.is_(None), spans.c.parent_id.is_not(None), spans.c.kind != "agent")
        )
        .values(agent=agent_of_parent)
    )
    rebuild_rollups(connection)


def _step_4_longer_ids(connection: Any) -> None:
    """Span and event ids of 255 characters, was 64: a durable run's workflow span has the
    run's id (up to 200 characters, the user's choice), and ``~2`` after it when resumed. On
    PostgreSQL a run whose id was longer than 64 characters had its spans refused, and the batch
    they were in with them. (SQLite does not enforce a column's declared length: nothing to do
    there.) Widening a VARCHAR rewrites neither the table nor its indexes on PostgreSQL."""
    if connection.dialect.name != "postgresql":
        return
    for table, columns in (
        ("kagura_spans", ("span_id", "run_id", "parent_id")),
        ("kagura_events", ("span_id", "run_id")),
    ):
        changes = ", ".join(f"ALTER COLUMN {c} TYPE VARCHAR(255)" for c in columns)
        connection.exec_driver_sql(f"ALTER TABLE {table} {changes}")


#: The columns of a span's row in a staged batch: the recorder's message of versions 1 and
#: earlier (``kagura.observability._writer.WIRE_COLUMNS`` at commit cf3ef53).
_STAGED_COLUMNS = 21


def _staged_rows(message: tuple[Any, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of the spans and events tables in a staged batch, as the earlier version's
    writer made them: ids sent as numbers made text with the recording process's prefix, times
    in seconds, recorded values as JSON text. (Staged batches never held anything to redact:
    batches that might were written at once, never staged.)"""
    import json

    from .._context import id_format

    _, running, finished, events, prefix, pid, *rest = message
    host, start = (*rest, None, None)[:2]
    if finished and not isinstance(finished[0], (tuple, list)):  # one flat list of values
        each = iter(finished)
        finished = list(zip(*[each] * _STAGED_COLUMNS, strict=True))
    text_id = id_format(prefix)

    def ident(value: Any) -> Any:
        return value if value is None or type(value) is str else text_id % value

    def as_text(value: Any) -> str | None:
        if type(value) is bytes:
            return value.decode()
        return None if value is None else json.dumps(value, ensure_ascii=False)

    spans = []
    for row in [*running, *finished]:
        (span_id, run_id, parent_id, kind, name, key, seq, status, start_ns, end_ns) = row[:10]
        model, prompt, completion, cost, llm_calls, retries, error, error_type = row[10:18]
        inputs = row[18]
        if kind == "llm" and type(inputs) is str:  # an attempt's one user message
            inputs = json.dumps([{"role": "user", "content": inputs}], ensure_ascii=False)
        else:
            inputs = as_text(inputs)
        spans.append(
            {
                "span_id": ident(span_id),
                "run_id": ident(run_id),
                "parent_id": ident(parent_id),
                "kind": kind,
                "name": name,
                "step_key": key if seq is None else f"{key}/{name}#{seq}",
                "status": status,
                "started_at": start_ns / 1e9,
                "ended_at": None if end_ns is None else end_ns / 1e9,
                "duration_ms": None if end_ns is None else (end_ns - start_ns) / 1e6,
                "model": model,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cost_usd": cost,
                "llm_calls": llm_calls,
                "retries": retries,
                "error": error,
                "error_type": error_type,
                "inputs": inputs,
                "output": as_text(row[19]),
                "attributes": as_text(row[20]),
                "pid": pid,
                "host": host,
                "pid_start": start,
            }
        )
    names = ("span_id", "run_id", "name", "at", "attributes")
    return spans, [dict(zip(names, event, strict=True)) for event in events]


def _write_staged(
    connection: Any, spans: list[dict[str, Any]], events: list[dict[str, Any]]
) -> None:
    """Rows of a staged batch into the tables (encrypted, if this process has a key, as the
    earlier version's readers did when they wrote staged batches in)."""
    from .. import _encryption
    from ._dialect import insert
    from ._schema import events as events_table
    from ._schema import spans as spans_table

    if _encryption.enabled():
        for row in spans:
            for column in ("error", "inputs", "output", "attributes"):
                row[column] = _encryption.encrypt(row[column])
        for row in events:
            row["attributes"] = _encryption.encrypt(row["attributes"])
    if spans:
        statement = insert(connection, spans_table)
        # A finished row replaces its running one (as the earlier writer's upsert did).
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=["span_id"],
                set_={
                    c.name: statement.excluded[c.name]
                    for c in spans_table.columns
                    if c.name != "span_id"
                },
            ),
            spans,
        )
    if events:
        connection.execute(events_table.insert(), events)


def _step_5_name_index(connection: Any) -> None:
    """The index of spans by name and start time made with their kind, status and duration
    (``ix_kagura_spans_name_started_duration``, in place of ``ix_kagura_spans_name_started``),
    so that one agent's durations over part of a day are read from the index alone. It reads
    the spans table once: about 7 s per million agent calls on SQLite, 8 s on PostgreSQL
    (measured on a store of 10 million)."""
    _step_1_baseline(connection)  # drops the retired index, makes the new one


def _step_6_runs_by_update(connection: Any) -> None:
    """An index of durable runs by their time of update alone (``ix_kagura_runs_updated``), so
    that the last runs updated (``kagura runs list``) are read from its end: without it, every
    run was read and sorted, and the listing grew with the journal. It reads the runs table
    once: about 0.6 s per million runs on SQLite."""
    _step_1_baseline(connection)  # makes the new index


def _step_7_lease_length(connection: Any) -> None:
    """Each durable run keeps the length of its holder's lease (``kagura_runs.lease_seconds``):
    a process whose ``KAGURA_LEASE_SECONDS`` was shorter than the holder's took live runs over,
    and both executed them. Runs journaled before have none, and are judged by the reader's
    setting, as before. Adding a nullable column rewrites no table."""
    _step_1_baseline(connection)  # adds the column


#: The steps, in order: ``STEPS[n - 1]`` takes a store from version ``n - 1`` to ``n``.
STEPS: tuple[Callable[[Any], None], ...] = (
    _step_1_baseline,
    _step_2_no_staging,
    _step_3_rollups,
    _step_4_longer_ids,
    _step_5_name_index,
    _step_6_runs_by_update,
    _step_7_lease_length,
)
assert len(STEPS) == SCHEMA_VERSION


def stored_version(connection: Any) -> int:
    """The store's schema version: 0 for a new store, or one made before versions were kept."""
    from sqlalchemy import inspect, select

    from ._schema import schema_version

    if not inspect(connection).has_table(schema_version.name):
        return 0
    return int(connection.execute(select(schema_version.c.version)).scalar() or 0)


def upgrade(engine: Any, name: str = "the store") -> int:
    """Bring the store behind ``engine`` to :data:`SCHEMA_VERSION`; the version it was at.
    ``name``: how a message names the store (no password in it).

    A store at a newer version than this code's is left alone: its tables are a superset of
    ours (steps only add, or drop what no version reads any more)."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import DBAPIError

    from ._schema import spans

    with engine.connect() as connection:
        found = stored_version(connection)
        # A new store is made in moments: no one waits long for it, and no lock file is made.
        new = found == 0 and not inspect(connection).has_table(spans.name)
        connection.rollback()
    if found >= SCHEMA_VERSION:
        return found
    version = found
    upgrading = None if new else found
    # Bounded: every race lost means another process made progress on the same steps.
    attempts = 20
    with _one_upgrader(engine, name, upgrading):
        while version < SCHEMA_VERSION:
            try:
                with engine.begin() as connection:
                    version = _locked_version(connection)
                    if version >= SCHEMA_VERSION:  # another process took the steps meanwhile
                        break
                    # A new store is made whole in one transaction: a process opening it
                    # meanwhile finds nothing or all of it, never what looks like an older
                    # store being upgraded (it would say that it waits for an upgrade).
                    done = SCHEMA_VERSION if new and version == 0 else version + 1
                    for step in STEPS[version:done]:
                        step(connection)
                    _record(connection, done)
            except DBAPIError as error:
                attempts -= 1
                if attempts == 0 or not _lost_a_race(error):
                    raise
                continue
            version = done
    return found


@contextlib.contextmanager
def _one_upgrader(engine: Any, name: str, found: int | None) -> Iterator[None]:
    """Held while this process upgrades a store from version ``found`` (``None``: a new store,
    made in moments, so without it): a lock that only upgraders take, for the whole upgrade,
    waited for without limit. On SQLite, an exclusive lock on a file beside the store
    (``.events.db.upgrade.lock`` for ``events.db``, made on its first upgrade and left there,
    empty); on PostgreSQL, an advisory lock of the session.

    The locks of each step (see :func:`_locked_version`) are not enough to wait on. On SQLite
    that is the store's write lock, which a step holds for as long as it takes (minutes on a
    store of millions of calls): another process opening the store meanwhile gave up after the
    busy timeout (60 s) with "database is locked", and its recording was turned off or its
    durable run failed. A lock of upgraders alone tells an upgrade apart from writers, whose
    turns are short. Both locks go with their holder if it dies, so a killed upgrader holds no
    one up. Where there is no ``fcntl`` (not POSIX), or the file cannot be made, a process waits
    as long as the busy timeout, as before."""
    if found is None:
        yield
    elif engine.dialect.name == "postgresql":
        with _session_lock(engine, name, found):
            yield
    else:
        with _file_lock(engine, name, found):
            yield


@contextlib.contextmanager
def _session_lock(engine: Any, name: str, found: int) -> Iterator[None]:
    with engine.connect() as connection:
        try:
            free = connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({_UPGRADER_LOCK})")
            if not free.scalar():
                with _waiting(name, found):
                    connection.exec_driver_sql(f"SELECT pg_advisory_lock({_UPGRADER_LOCK})")
            connection.commit()  # not left in a transaction while the steps run
            yield
        finally:
            connection.invalidate()  # closed, not put back in the pool: the lock goes with it


@contextlib.contextmanager
def _file_lock(engine: Any, name: str, found: int) -> Iterator[None]:
    path = _lock_file(engine)
    try:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666) if path else -1
    except (ImportError, OSError):
        fd = -1
    if fd < 0:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with _waiting(name, found):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # lets go of the lock


@contextlib.contextmanager
def _waiting(name: str, found: int | None) -> Iterator[None]:
    """Around waiting for another process's upgrade of the store from version ``found`` (to
    this code's; ``None``: from this code's, to a newer one): it may take minutes, and nothing
    else would show why this process stands still."""
    versions = (
        f"from schema version {found} to {SCHEMA_VERSION}"
        if found is not None
        else "to a newer schema version"
    )
    _log.warning(
        "kagura: another process is upgrading the store %s %s; waiting for it to finish (on a "
        "store of millions of calls, this takes minutes)",
        name,
        versions,
    )
    started = time.monotonic()
    yield
    _log.info("kagura: waited %.1f s for another process's upgrade", time.monotonic() - started)


def wait_for_an_upgrade(engine: Any) -> bool:
    """If another process is upgrading the SQLite store behind ``engine``, wait until it is
    done (and say so); whether it waited.

    For a process that had the store open before the upgrade began (a newer version's, say),
    whose write failed with "database is locked" after the busy timeout: it writes again once
    the upgrade is done, instead of dropping its batch of recordings or failing its durable
    run. (A store at a newer version is one this code can go on writing: see :func:`upgrade`.)
    On PostgreSQL, a write waits for the upgrade's locks without limit by itself."""
    path = _lock_file(engine) if engine.dialect.name == "sqlite" else None
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY) if path else -1  # none: never upgraded by this code
    except (ImportError, OSError):
        return False
    if fd < 0:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # no upgrade holds it: what locked the store was something else
        except BlockingIOError:
            with _waiting(engine.url.database, None):
                fcntl.flock(fd, fcntl.LOCK_SH)
            return True
    finally:
        os.close(fd)


def _lock_file(engine: Any) -> str | None:
    """The file :func:`_one_upgrader` locks beside a SQLite store's (``None`` for in-memory and
    URI ones)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    directory, name = os.path.split(database)
    return os.path.join(directory, f".{name}.upgrade.lock")  # as the writers' .<name>.writers/


#: The keys of PostgreSQL's advisory locks: "kagura" in ASCII, then 1 for the lock each step
#: takes, 3 for the lock an upgrader holds through all of them (``kagura._storage._rollups``
#: has 2).
_STEPS_LOCK = 0x6B6167757261_0001
_UPGRADER_LOCK = 0x6B6167757261_0003


def _locked_version(connection: Any) -> int:
    """The store's version, read holding its lock for upgrades until the transaction ends: so
    processes opening a store at once take its steps one at a time, each after reading where the
    one before left it. Without it, a process that read an old version before another finished
    upgrading took the steps again, and step 3 rebuilt the rollups (a DELETE, then inserts) while
    the other process's writer was already adding to them: on PostgreSQL the two deadlocked,
    and the writer's batch was lost."""
    from sqlalchemy import update

    from ._schema import schema_version

    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_STEPS_LOCK})")
    else:
        # SQLite lets one transaction write at a time, and a write takes that lock for the rest
        # of the transaction: an UPDATE that changes nothing takes it. (The table is made first,
        # outside the transaction, for a new store; a race to make it is a race lost, below.)
        schema_version.create(connection, checkfirst=True)
        connection.execute(update(schema_version).values(version=schema_version.c.version))
    return stored_version(connection)


def _record(connection: Any, version: int) -> None:
    """Record that the store is at ``version`` (never lower a version another process wrote)."""
    from sqlalchemy import update

    from ._dialect import insert
    from ._schema import schema_version

    connection.execute(
        insert(connection, schema_version)
        .values(id=1, version=version)
        .on_conflict_do_nothing(index_elements=["id"])
    )
    connection.execute(
        update(schema_version)
        .where(schema_version.c.id == 1, schema_version.c.version < version)
        .values(version=version)
    )


def _lost_a_race(error: Any) -> bool:
    """Whether a step failed because another process was making the same change."""
    from sqlalchemy import exc

    orig = getattr(error, "orig", None)
    sqlstate = str(getattr(orig, "sqlstate", None) or "")
    # PostgreSQL: a duplicate table, object, column or type row; a deadlock or serialisation
    # failure (class 40) between two CREATEs. SQLite: "table ... already exists", "duplicate
    # column name".
    return (
        isinstance(error, exc.IntegrityError)
        or sqlstate in ("42P07", "42710", "42701")
        or sqlstate.startswith("40")
        or "already exists" in str(orig)
        or "duplicate column" in str(orig)
    )
