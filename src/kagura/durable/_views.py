"""What ``kagura runs`` draws: rich renderables built from :class:`Journal` records.

Each function turns journal records into one renderable (or one formatted value) and does nothing
else: no queries, no printing, so the CLI composes them and tests can render them alone. Recorded
text (ids, names, arguments, outputs, errors) goes into :class:`~rich.text.Text` objects, never
into markup, so a ``[`` in a step's output is shown as it is, and through
:func:`~kagura._table.visible`, so an escape sequence in it is shown, not obeyed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from rich import box
from rich.console import Group, JustifyMethod
from rich.table import Table
from rich.text import Text

from .._table import (
    DASH,
    FittedTable,
    error_excerpt,
    excerpt,
    format_seconds,
    format_time,
    format_when,
    status_text,
    visible,
)
from ._execute import Recovered
from ._journal import RunRecord, StepRecord

# Columns of the runs table, and the order in which a narrow terminal drops them.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run id", "left"),
    ("workflow", "left"),
    ("status", "left"),
    ("steps", "right"),
    ("attempts", "right"),
    ("started", "left"),
    ("updated", "left"),
    ("pid@host", "left"),
    ("error", "left"),
)
_DROP_ORDER = ("updated", "pid@host", "attempts", "started", "workflow")
_MAX_WIDTHS = {"run id": 36, "workflow": 28, "pid@host": 40, "error": 60}
_MIN_ERROR_WIDTH = 24
_RUNS_TABLE = FittedTable(_COLUMNS, _DROP_ORDER, _MAX_WIDTHS, _MIN_ERROR_WIDTH)

# -- single values ----------------------------------------------------------------------------


def as_datetime(timestamp: float | None) -> datetime | None:
    """A journal timestamp (seconds since the epoch) as a local, zone-aware datetime."""
    return None if not timestamp else datetime.fromtimestamp(timestamp).astimezone()


def owner_text(record: RunRecord) -> str:
    """``pid@host`` of the process that executes (or last executed) the run."""
    if record.pid is None and not record.host:
        return DASH
    return visible(f"{record.pid if record.pid is not None else '?'}@{record.host or '?'}")


def count_steps(count: int) -> str:
    """``1 step``, ``0 steps``, ``4 steps``."""
    return f"{count} step" if count == 1 else f"{count} steps"


def ordered_steps(steps: Mapping[str, StepRecord] | Iterable[StepRecord]) -> list[StepRecord]:
    """Steps in the order they were journaled (by step key when the time is unknown)."""
    records = list(steps.values()) if isinstance(steps, Mapping) else list(steps)
    return sorted(records, key=lambda s: (s.created_at or 0.0, s.step_key))


# -- list -------------------------------------------------------------------------------------


def run_cells(record: RunRecord, *, now: datetime | None = None) -> dict[str, Text]:
    """The table cells of one run, by column."""
    return {
        "run id": Text(visible(record.run_id), style="bold"),
        "workflow": Text(visible(record.workflow)),
        "status": status_text(record.status),
        "steps": Text(str(record.steps)),
        "attempts": Text(str(record.attempts), style="yellow" if record.attempts > 1 else ""),
        "started": Text(format_when(as_datetime(record.created_at), now=now)),
        "updated": Text(format_when(as_datetime(record.updated_at), now=now)),
        "pid@host": Text(owner_text(record), style="dim"),
        "error": Text(error_excerpt(record.error, record.error_type), style="red"),
    }


def runs_table(
    records: Sequence[RunRecord], *, title: str | None = "Durable runs", width: int | None = None
) -> Table:
    """One row per run: id, workflow, status, steps journaled, attempts, start, last update,
    ``pid@host`` and an excerpt of the error. With ``width`` (the terminal's), the least useful
    columns are left out rather than every column squeezed."""
    return _RUNS_TABLE.table([run_cells(r) for r in records], title=title, width=width)


# -- show -------------------------------------------------------------------------------------


def lease_text(record: RunRecord, lease: float, *, now: float | None = None) -> Text:
    """Who holds the run and how fresh its heartbeat is."""
    now = time.time() if now is None else now
    lease = record.lease(lease)
    text = Text(visible(f"pid {record.pid} on {record.host}") if record.pid else owner_text(record))
    if record.status == "interrupted" and record.heartbeat_at == 0:
        text.append(" (cancelled: its lease was given up)", style="yellow")
    if record.status in ("running", "interrupted") and record.heartbeat_at:
        age = max(0.0, now - record.heartbeat_at)
        text.append(f", last heartbeat {format_seconds(age)} ago ", style="dim")
        if record.status == "interrupted" and age < lease:
            text.append("(the process is gone)", style="yellow")
        elif record.status == "interrupted":
            text.append(f"(lease of {lease:g}s expired: the process is gone)", style="yellow")
        else:
            text.append(f"(lease {lease:g}s)", style="dim")
    return text


def run_header(record: RunRecord, lease: float, *, now: float | None = None) -> Table:
    """The run's own fields: workflow, status, target, arguments, attempts, times, owner, and
    its result or error."""
    table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("run", Text(visible(record.run_id), style="bold"))
    table.add_row("workflow", Text(visible(record.workflow)))
    table.add_row("status", status_text(record.status))
    table.add_row("target", Text(visible(record.target or DASH), style="dim"))
    table.add_row("arguments", Text(excerpt(record.arguments, 200) or DASH))
    table.add_row("steps", Text(f"{count_steps(record.steps)} journaled"))
    table.add_row("attempts", Text(str(record.attempts)))
    table.add_row("started", Text(format_time(as_datetime(record.created_at))))
    table.add_row("updated", Text(format_time(as_datetime(record.updated_at))))
    table.add_row("process", lease_text(record, lease, now=now))
    if record.status == "completed":
        table.add_row("result", Text(excerpt(record.result, 200) or DASH))
    if record.error:
        table.add_row(
            "error", Text(error_excerpt(record.error, record.error_type, 200), style="red")
        )
    return table


def step_cells(number: int, record: StepRecord) -> dict[str, Text]:
    """The table cells of one journaled step, by column."""
    return {
        "#": Text(str(number), style="dim"),
        "step key": Text(visible(record.step_key)),
        "kind": Text(visible(record.kind), style="yellow" if record.kind == "step" else "blue"),
        "name": Text(visible(record.name)),
        "input": Text(visible(record.input_hash[:10]), style="dim"),
        "output": Text(excerpt(record.output, 200) or DASH),
    }


_STEP_COLUMNS = ("#", "step key", "kind", "name", "input", "output")
_STEP_DROP_ORDER = ("name", "#")  # the step key already ends with the name
_STEP_MAX_WIDTHS = {"step key": 44, "name": 24, "output": 80}
_MIN_OUTPUT_WIDTH = 20


def _output_room(rows: Sequence[Mapping[str, Text]], columns: Sequence[str], width: int) -> int:
    """The cells left for the output column when the others take what they need."""
    others = [
        min(max([len(c), *(r[c].cell_len for r in rows)]), _STEP_MAX_WIDTHS.get(c, width))
        for c in columns
        if c != "output"
    ]
    return width - (sum(others) + 2 * len(others) + 2)


def steps_table(
    steps: Mapping[str, StepRecord] | Iterable[StepRecord], *, width: int | None = None
) -> Table:
    """One row per journaled step, in journal order: step key, kind, name, the prefix of its
    input hash and an excerpt of its recorded output. With ``width`` (the terminal's), the
    output excerpt takes what the other columns leave, and a narrow terminal drops the name
    (the step key ends with it)."""
    rows = [step_cells(n, r) for n, r in enumerate(ordered_steps(steps), 1)]
    columns = list(_STEP_COLUMNS)
    limits = dict(_STEP_MAX_WIDTHS)
    if width is not None:
        for name in _STEP_DROP_ORDER:
            if _output_room(rows, columns, width) >= _MIN_OUTPUT_WIDTH:
                break
            columns.remove(name)
        room = _output_room(rows, columns, width)
        limits["output"] = max(_MIN_OUTPUT_WIDTH, min(limits["output"], room))
    table = Table(
        title="Journaled steps",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        title_justify="left",
        collapse_padding=True,
        pad_edge=False,
    )
    for name in columns:
        table.add_column(
            name,
            justify="right" if name == "#" else "left",
            no_wrap=True,
            overflow="ellipsis",
            max_width=limits.get(name),
        )
    for row in rows:
        table.add_row(*(row[name] for name in columns))
    if not rows:
        table.add_row(*(Text("none yet", style="dim") if c == "step key" else "" for c in columns))
    return table


def next_step_hint(record: RunRecord) -> Text | None:
    """What can be done with the run now, when something can."""
    if record.status in ("interrupted", "failed"):
        return Text(
            f"Resume it with: kagura runs resume {visible(record.run_id)}  (journaled steps are "
            "not run again)",
            style="yellow",
        )
    if record.status == "running":
        return Text(
            "It is being executed now. If its process dies it is listed as interrupted and can "
            "be resumed: at once on its own host, elsewhere once its lease runs out.",
            style="dim",
        )
    return None


def run_view(
    record: RunRecord,
    steps: Mapping[str, StepRecord] | Iterable[StepRecord],
    lease: float,
    *,
    now: float | None = None,
    width: int | None = None,
) -> Group:
    """``kagura runs show``: the header, the journaled steps and what to do next."""
    hint = next_step_hint(record)
    parts = [run_header(record, lease, now=now), steps_table(steps, width=width)]
    return Group(*parts, *([hint] if hint is not None else []))


# -- recover ----------------------------------------------------------------------------------

_OUTCOME_STYLES = {
    "completed": "green",
    "failed": "bold red",
    "taken": "dim",
    "unloadable": "bold red",
}


def recovered_table(outcomes: Sequence[Recovered], *, width: int | None = None) -> Table:
    """``kagura runs recover``: one row per interrupted run, what became of it, how many of its
    steps came from the journal and ran now, and the error of those that did not complete."""
    table = Table(
        title="Recovered runs",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        title_justify="left",
        width=width,
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("run id", "left"),
        ("workflow", "left"),
        ("outcome", "left"),
        ("from journal", "right"),
        ("ran now", "right"),
        ("error", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    for o in outcomes:
        error = "" if o.error is None else f"{type(o.error).__name__}: {o.error}"
        table.add_row(
            Text(visible(o.run_id), style="bold"),
            Text(visible(o.workflow)),
            Text(o.outcome, style=_OUTCOME_STYLES.get(o.outcome, "")),
            Text(str(o.replayed) if o.outcome == "completed" else DASH),
            Text(str(o.ran) if o.outcome == "completed" else DASH),
            Text(excerpt(error, 120), style="red" if o.outcome != "taken" else "dim"),
        )
    counts = {k: sum(o.outcome == k for o in outcomes) for k in _OUTCOME_STYLES}
    table.caption = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return table
