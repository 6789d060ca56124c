"""The store's tables (SQLAlchemy Core, so SQLite and PostgreSQL share one definition): the
event store's (the recorder writes them, :mod:`kagura.observability` reads them) and the durable
journal's (:mod:`kagura.durable`).

``spans`` holds one row per workflow run, agent call, LLM attempt and tool call, inserted as
``running`` when it starts and completed when it ends; its metrics columns are totals over the
span's subtree. ``events`` holds what happened inside spans (retry waits, breaker changes, ...).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

spans = Table(
    "kagura_spans",
    metadata,
    # A durable run's workflow span has the run's id, with ~2 after it when resumed.
    Column("span_id", String(255), primary_key=True),
    Column("run_id", String(255), nullable=False),
    Column("parent_id", String(255)),
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
    # The agent call an LLM attempt or tool call was made for (its name; NULL for spans whose
    # parent is not an agent call, and for agent calls): what the rollups count an attempt's
    # cost under when a query asks for one agent's.
    Column("agent", String(255)),
)

Index("ix_kagura_spans_run", spans.c.run_id)
# No index on parent_id: every query that reads a run's tree goes by run_id, and an index the
# writer must keep up to date costs each recorded span about 1 µs (measured) for no query.
Index("ix_kagura_spans_kind_started", spans.c.kind, spans.c.started_at)
# One name's spans in time order (``kagura monitor list --agent``), with what the durations of
# one agent's calls over part of a day are read by (``stats(agent_name=..., since=...)``: see
# observability/_totals): that read never leaves the index. Looking each span up in the table
# took 0.5 s for a day of one agent's calls in a store of 10M on SQLite.
Index(
    "ix_kagura_spans_name_started_duration",
    spans.c.name,
    spans.c.started_at,
    spans.c.kind,
    spans.c.status,
    spans.c.duration_ms,
)
# A latency percentile is read from it: the rollups say which 2% range of durations holds it, and
# the query walks that range here (see observability/_totals). The columns a query may filter on
# are in it, so the walk never leaves the index: with one agent's name looked up in the table,
# stats(agent_name=...) over 10M agent calls took 0.5 s on PostgreSQL.
Index(
    "ix_kagura_spans_latency",
    spans.c.kind,
    spans.c.duration_ms,
    spans.c.status,
    spans.c.name,
    spans.c.started_at,
)
# Only the running rows (a few, at any time): finding those of processes that are gone costs a
# look at them, not a scan of the table; finished rows never enter it.
Index(
    "ix_kagura_spans_running",
    spans.c.host,
    spans.c.pid,
    sqlite_where=spans.c.status == "running",
    postgresql_where=spans.c.status == "running",
)
# The interrupted rows (few: a process's spans when it died): the rollups leave them out (a
# finished row may still replace one), so queries add them from here.
Index(
    "ix_kagura_spans_interrupted",
    spans.c.kind,
    spans.c.started_at,
    sqlite_where=spans.c.status == "interrupted",
    postgresql_where=spans.c.status == "interrupted",
)

events = Table(
    "kagura_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("span_id", String(255)),
    Column("run_id", String(255)),
    Column("name", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Column("attributes", Text),
)

Index("ix_kagura_events_span", events.c.span_id)
Index("ix_kagura_events_run", events.c.run_id)

# -- rollups: what the monitor's statistics read (see _rollups) ---------------------------------

rollups = Table(
    "kagura_rollups",
    metadata,
    Column("kind", String(16), primary_key=True),  # agent, llm, or workflow (runs: roots only)
    # An LLM attempt is counted twice: under its agent's name, and under "" (every agent's).
    # "" for the other kinds.
    Column("agent", String(255), primary_key=True),
    Column("hour", BigInteger, primary_key=True, autoincrement=False),  # started_at // 3600
    Column("name", String(255), primary_key=True),  # an LLM attempt's: its model ("" if none)
    Column("status", String(16), primary_key=True),
    Column("calls", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("cost_usd", Float, nullable=False),  # of the calls whose cost was known
    Column("unpriced", BigInteger, nullable=False),  # calls whose cost was not known
    # SQLite: the rows stored in key order (no rowid, no second copy of the key in an index),
    # so a query's range of hours is one walk along the table and an upsert one lookup.
    sqlite_with_rowid=False,
)

latency = Table(
    "kagura_latency",
    metadata,
    # Agent calls' durations, counted per bucket (see _rollups.EDGES): under the agent's name,
    # and under "" (every agent's).
    Column("agent", String(255), primary_key=True),
    Column("hour", BigInteger, primary_key=True, autoincrement=False),
    Column("bucket", Integer, primary_key=True, autoincrement=False),
    Column("calls", BigInteger, nullable=False),
    sqlite_with_rowid=False,
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
    # The holder's KAGURA_LEASE_SECONDS: how long after its last heartbeat the run is free,
    # whatever the reader's own setting. NULL in rows written before version 7: the reader's.
    Column("lease_seconds", Float),
)

Index("ix_kagura_runs_status", runs.c.status, runs.c.updated_at)
# The last runs updated, whatever their status (``kagura runs list``): read from the end of this
# index, not found by sorting every run.
Index("ix_kagura_runs_updated", runs.c.updated_at)

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
    Column("position", Integer),  # its place among its parent's steps (see Span.position)
)

# -- the store's schema version (see _migrations) ------------------------------------------------

schema_version = Table(
    "kagura_schema",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one row
    Column("version", Integer, nullable=False),
)

#: Indexes of kagura_spans that earlier versions made and this one does not use: dropped from
#: stores when they are opened.
RETIRED_INDEXES = (
    "ix_kagura_spans_parent",
    "ix_kagura_spans_kind_duration",
    "ix_kagura_spans_kind_duration_status",
    "ix_kagura_spans_name_started",
)
