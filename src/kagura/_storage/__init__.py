"""The storage layer: one database for the event store and the durable journal.

Everything that touches the database's shape lives here, and :mod:`kagura.observability` and
:mod:`kagura.durable` use it through this package's names (never its modules):

- engines, and store faults as :class:`~kagura.errors.StoreError` (``_engine``);
- the schema of every table (``_schema``): the event store's spans and events, the journal's
  runs and steps, and the schema version;
- dialect-specific statements (``_dialect``);
- migrations, by one version table (``_migrations``): a store made by an older version is
  upgraded when it is opened;
- rollups (``_rollups``): the running totals the monitor's statistics read, kept by the writer;
- closing spans whose process died (``_interrupted``), which readers, recovery and the journal's
  take-overs all do.

Importing it is light: SQLAlchemy is imported when a table or an engine is first used, so that
``import kagura`` does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._dialect import insert, positional_sql
from ._engine import (
    can_write,
    default_url,
    dispose_all,
    engine_for,
    foreign_tables,
    forget,
    holds_no_store,
    is_store_fault,
    lost_to_another,
    may_come_back,
    normalise_url,
    redact_url,
    refused_values,
    scrub_url,
    sqlite_path,
    store_error,
    store_errors,
    store_name,
    synced_engine_for,
    transaction,
    use_a_large_page_cache,
)
from ._interrupted import INTERRUPTED, close_run_spans, close_spans_of_gone_processes
from ._migrations import SCHEMA_VERSION, stored_version, upgrade
from ._rollups import (
    HOUR,
    NOT_FINAL,
    ROLLUP_COLUMNS,
    Tally,
    bucket,
    bucket_range,
    day_hour,
    hour_of,
    rebuild_rollups,
    take_off_rollups,
    tally_of,
    write_rollups,
)

if TYPE_CHECKING:
    from ._schema import events, latency, metadata, rollups, runs, schema_version, spans, steps

_TABLES = frozenset(
    {"events", "latency", "metadata", "rollups", "runs", "schema_version", "spans", "steps"}
)


def __getattr__(name: str) -> Any:
    # The tables import SQLAlchemy: loaded on first use (see the module docstring).
    if name in _TABLES:
        from . import _schema

        return getattr(_schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HOUR",
    "INTERRUPTED",
    "NOT_FINAL",
    "ROLLUP_COLUMNS",
    "SCHEMA_VERSION",
    "Tally",
    "bucket",
    "bucket_range",
    "can_write",
    "close_run_spans",
    "close_spans_of_gone_processes",
    "day_hour",
    "default_url",
    "dispose_all",
    "engine_for",
    "events",
    "foreign_tables",
    "forget",
    "holds_no_store",
    "hour_of",
    "insert",
    "is_store_fault",
    "latency",
    "lost_to_another",
    "may_come_back",
    "metadata",
    "normalise_url",
    "positional_sql",
    "rebuild_rollups",
    "redact_url",
    "refused_values",
    "rollups",
    "runs",
    "schema_version",
    "scrub_url",
    "spans",
    "sqlite_path",
    "steps",
    "store_error",
    "store_errors",
    "store_name",
    "stored_version",
    "synced_engine_for",
    "take_off_rollups",
    "tally_of",
    "transaction",
    "upgrade",
    "use_a_large_page_cache",
    "write_rollups",
]
