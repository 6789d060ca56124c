"""The store's schema as commit cf3ef53 made it (before stores kept a schema version): a copy of
that commit's ``kagura/observability/_schema.py``, for the upgrade tests to make such a store.
Never change it: it is what old stores on users' disks look like."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

spans = Table(
    "kagura_spans",
    metadata,
    Column("span_id", String(64), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("parent_id", String(64)),
    Column("kind", String(16), nullable=False),
    Column("name", String(255), nullable=False),
    Column("step_key", Text),
    Column("status", String(16), nullable=False),
    Column("started_at", Float, nullable=False),  # Unix seconds
    Column("ended_at", Float),
    Column("duration_ms", Float),
    Column("model", String(255)),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("total_tokens", Integer, nullable=False, default=0),
    Column("cost_usd", Float),  # NULL: unknown (some call had no known price)
    Column("llm_calls", Integer, nullable=False, default=0),
    Column("retries", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("error_type", String(255)),
    Column("inputs", Text),  # JSON, hashed or absent per the privacy setting
    Column("output", Text),
    Column("attributes", Text),  # JSON
    Column("pid", BigInteger),
    # The process that recorded it (with pid): once it is known gone, its running spans are
    # closed as interrupted (see _interrupted).
    Column("host", String(255)),
    Column("pid_start", String(64)),
)

Index("ix_kagura_spans_run", spans.c.run_id)
# No index on parent_id: every query that reads a run's tree goes by run_id, and an index the
# writer must keep up to date costs each recorded span about 1 µs (measured) for no query.
Index("ix_kagura_spans_kind_started", spans.c.kind, spans.c.started_at)
Index("ix_kagura_spans_name_started", spans.c.name, spans.c.started_at)
# Latency percentiles walk it in duration order; with the status in it, counting calls by status
# reads the index alone (measured over 1M agent calls: 0.2 s, against 4.5 s through the table).
Index("ix_kagura_spans_kind_duration_status", spans.c.kind, spans.c.duration_ms, spans.c.status)
# Only the running rows (a few, at any time): finding those of processes that are gone costs a
# look at them, not a scan of the table; finished rows never enter it.
Index(
    "ix_kagura_spans_running",
    spans.c.host,
    spans.c.pid,
    sqlite_where=spans.c.status == "running",
    postgresql_where=spans.c.status == "running",
)

events = Table(
    "kagura_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("span_id", String(64)),
    Column("run_id", String(64)),
    Column("name", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Column("attributes", Text),
)

Index("ix_kagura_events_span", events.c.span_id)
Index("ix_kagura_events_run", events.c.run_id)

# Batches the writer has made durable but not yet written into the tables above (a burst's, while
# it goes on: see ``_writer.StoreWriter.stage``). Every reader writes them in first
# (``_writer.catch_up``), so queries never miss a recorded row.
staged = Table(
    "kagura_staged",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("spans", Integer, nullable=False),  # rows in the batch (spans and events)
    Column("batch", LargeBinary, nullable=False),  # the recorder's message, as marshal made it
)

# -- durable runs: the journal (see kagura.durable) ---------------------------------------------

runs = Table(
    "kagura_runs",
    metadata,
    Column("run_id", String(255), primary_key=True),
    Column("workflow", String(255), nullable=False),
    Column("target", Text),  # "module:qualname" (or "path.py:qualname") to import on resume
    Column("status", String(16), nullable=False),  # running, completed, failed (interrupted: stale)
    Column("arguments", Text),  # JSON of the bound arguments
    Column("result", Text),  # JSON
    Column("error", Text),
    Column("error_type", String(255)),
    Column("owner", String(64)),  # who holds the lease
    Column("pid", BigInteger),
    Column("host", String(255)),
    # Which process the pid named (boot id and start time, see kagura._process): a reused pid
    # is told apart from the process that held the run.
    Column("pid_start", String(64)),
    Column("heartbeat_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, default=1),
)

Index("ix_kagura_runs_status", runs.c.status, runs.c.updated_at)

steps = Table(
    "kagura_steps",
    metadata,
    Column("run_id", String(255), primary_key=True),
    Column("step_key", String(1024), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("input_hash", String(64), nullable=False),
    Column("output", Text),  # JSON
    Column("created_at", Float, nullable=False),
    Column("position", Integer),  # its place among its parent's steps (see Span._position)
)

#: Indexes of kagura_spans that earlier versions made and this one does not use: dropped from
#: stores when they are opened.
RETIRED_INDEXES = ("ix_kagura_spans_parent", "ix_kagura_spans_kind_duration")
