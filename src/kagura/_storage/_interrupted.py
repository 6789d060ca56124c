"""Spans whose process died before they ended: closed as ``interrupted`` once the death is known.

The recorder writes a span as ``running`` once it has been open a while (see
``_recorder._RUNNING_AFTER_NS``); a process killed meanwhile never writes how it ended, and the
row would say ``running`` for ever. A death becomes known in two ways, and each closes what it
can:

- on the host that recorded them, the process is gone (its pid no longer exists, or names
  another process; see :mod:`kagura._process`): :func:`close_spans_of_gone_processes`, which
  readers run before they query and recovery runs when it starts;
- a durable run is taken over: its earlier attempts' trees are closed in the transaction that
  claims it (:func:`close_run_spans`), wherever they ran.

A span closed here that its process did finish after all (the writer process delivers rows after
the recording process died) is overwritten by its finished row: that row tells the truth.

A closed span has no duration: when it ended is not known, only when someone noticed, which may be
days later. Its ``ended_at`` says when that was.
"""

from __future__ import annotations

from typing import Any

from .._process import HOST, is_gone

#: Why an interrupted span ended, as its error says.
INTERRUPTED = "its process ended before it did (killed, or it crashed)"


def _running() -> Any:
    # As a literal, not a bound parameter: SQLite uses a partial index (ix_kagura_spans_running)
    # only for a query whose condition is that index's own.
    from sqlalchemy import text

    return text("kagura_spans.status = 'running'")


def _closed(now: float) -> dict[str, Any]:
    return {
        "status": "interrupted",
        "ended_at": now,
        # Not now - started_at: that is how long until someone looked, and it made latency
        # percentiles depend on when the store was first read after a crash.
        "duration_ms": None,
        "error": INTERRUPTED,
        "error_type": None,
    }


def close_run_spans(connection: Any, run_ids: list[str], now: float) -> int:
    """Close the running spans of the run trees ``run_ids`` (in the caller's transaction); how
    many."""
    from sqlalchemy import update

    from ._schema import spans

    if not run_ids:
        return 0
    closed = connection.execute(
        update(spans).where(_running(), spans.c.run_id.in_(run_ids)).values(**_closed(now))
    )
    return int(closed.rowcount or 0)


def close_spans_of_gone_processes(connection: Any, now: float) -> int:
    """Close the running spans that processes of this host recorded and that are gone (in the
    caller's transaction); how many. One look at the running rows (an index holds only those)
    when every process that has some is alive."""
    from sqlalchemy import select, update

    from ._schema import spans

    recorded_by = connection.execute(
        select(spans.c.pid, spans.c.pid_start).where(_running(), spans.c.host == HOST).distinct()
    ).all()
    closed = 0
    for pid, start in recorded_by:
        if not is_gone(HOST, pid, start):
            continue
        same_start = spans.c.pid_start.is_(None) if start is None else spans.c.pid_start == start
        result = connection.execute(
            update(spans)
            .where(_running(), spans.c.host == HOST, spans.c.pid == pid, same_start)
            .values(**_closed(now))
        )
        closed += int(result.rowcount or 0)
    return closed
