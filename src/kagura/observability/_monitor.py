"""What ``kagura monitor`` draws: rich renderables built from :class:`EventStore` results.

Each function turns one store result into one renderable (or one formatted value) and does
nothing else: no queries, no printing, so the CLI composes them and tests can render them alone.
Everything recorded (names, errors, models) goes into :class:`~rich.text.Text` objects, never
into markup, so a ``[`` in an error message is shown as it is, and through
:func:`~kagura._table.visible` (:func:`shown`), so an escape sequence in it is shown, not obeyed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .._table import (
    DASH,
    STATUS_STYLES,
    FittedTable,
    error_excerpt,
    excerpt,
    format_duration,
    format_seconds,
    format_time,
    format_when,
    status_text,
    visible,
)

KIND_STYLES = {"workflow": "bold magenta", "agent": "bold blue", "llm": "cyan", "tool": "yellow"}

_EIGHTHS = " ▏▎▍▌▋▊▉"
_SPARKS = "▁▂▃▄▅▆▇█"

# -- single values ----------------------------------------------------------------------------


def shown(value: object) -> str:
    """A recorded value as text to show: its control and format characters as escapes."""
    return visible(str(value))


def format_cost(cost: float | None) -> str:
    """USD; ``unknown`` when some call had no known price (never shown as 0)."""
    if cost is None:
        return "unknown"
    if cost == 0:
        return "$0"
    if cost >= 1:
        return f"${cost:,.2f}"
    if cost >= 0.01:
        return f"${cost:.4f}"
    if cost >= 0.000001:
        return f"${cost:.6f}"
    return "<$0.000001"


def cost_text(cost: float | None) -> Text:
    return Text(format_cost(cost), style="dim italic" if cost is None else "")


def format_tokens(count: int | None) -> str:
    return DASH if count is None else f"{count:,}"


def format_rate(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def bar(value: float, maximum: float, width: int) -> str:
    """A horizontal bar of ``value / maximum`` of ``width`` cells, in eighths of a cell."""
    if value <= 0 or maximum <= 0 or width <= 0:
        return ""
    cells = min(value / maximum, 1.0) * width
    full = int(cells)
    eighths = int((cells - full) * 8)
    drawn = "█" * full + (_EIGHTHS[eighths] if eighths and full < width else "")
    return drawn or "▏"  # a sliver, so a small non-zero value still shows


def sparkline(values: Iterable[float | None], width: int | None = None) -> str:
    """``▁▂▃▄▅▆▇█``, one character per value (the last ``width``), scaled min to max."""
    points = [v for v in values if v is not None]
    if width is not None:
        points = points[-width:] if width > 0 else []
    if not points:
        return ""
    low, high = min(points), max(points)
    if high == low:
        return _SPARKS[3] * len(points)
    span = high - low
    return "".join(_SPARKS[round((v - low) / span * (len(_SPARKS) - 1))] for v in points)


# -- executions -------------------------------------------------------------------------------


# Columns of the executions table, and the order in which a narrow terminal drops them.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "left"),
    ("kind", "left"),
    ("name", "left"),
    ("status", "left"),
    ("started", "left"),
    ("duration", "right"),
    ("model", "left"),
    ("tokens", "right"),
    ("cost", "right"),
    ("llm calls", "right"),
    ("retries", "right"),
    ("error", "left"),
)
_DROP_ORDER = ("llm calls", "retries", "kind", "tokens", "model", "started", "duration")
_MAX_WIDTHS = {"name": 32, "model": 28, "error": 60}
_MIN_ERROR_WIDTH = 12
_EXECUTIONS_TABLE = FittedTable(_COLUMNS, _DROP_ORDER, _MAX_WIDTHS, _MIN_ERROR_WIDTH)


def execution_cells(execution: Mapping[str, Any]) -> dict[str, Text]:
    """The table cells of one execution, by column."""
    metrics = execution.get("metrics") or {}
    retries = int(metrics.get("retries") or 0)
    kind = str(execution["kind"])
    return {
        "id": Text(shown(execution["id"]), style="dim"),
        "kind": Text(shown(kind), style=KIND_STYLES.get(kind, "")),
        "name": Text(shown(execution["name"])),
        "status": status_text(str(execution["status"])),
        "started": Text(format_when(execution.get("started_at"))),
        "duration": Text(format_duration(execution.get("duration_ms"))),
        "model": Text(shown(execution.get("model") or DASH)),
        "tokens": Text(format_tokens(metrics.get("total_tokens"))),
        "cost": cost_text(metrics.get("total_cost")),
        "llm calls": Text(str(metrics.get("llm_calls") or 0)),
        "retries": Text(str(retries), style="yellow" if retries else ""),
        "error": Text(
            error_excerpt(execution.get("error"), execution.get("error_type")), style="red"
        ),
    }


def executions_table(
    executions: Sequence[Mapping[str, Any]],
    *,
    title: str | None = "Executions",
    width: int | None = None,
) -> Table:
    """One row per execution: id, kind, name, status, start, duration, model, tokens, cost, LLM
    calls, retries and an excerpt of the error. With ``width`` (the terminal's), the least
    useful columns are left out rather than every column squeezed."""
    return _EXECUTIONS_TABLE.table(
        [execution_cells(e) for e in executions], title=title, width=width
    )


# -- stats ------------------------------------------------------------------------------------


def _by_weight(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Costliest first, then most tokens, then most calls (an unknown cost ranks as 0)."""
    return sorted(
        rows,
        key=lambda r: (r.get("cost_usd") or 0.0, r.get("total_tokens") or 0, r.get("calls") or 0),
        reverse=True,
    )


def status_counts_table(stats: Mapping[str, Any], *, show_workflows: bool = True) -> Table:
    """Agent calls by status, the failure rate and the number of workflow runs."""
    table = Table(title="Agent calls", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("status")
    table.add_column("count", justify="right")
    by_status: Mapping[str, int] = stats.get("by_status") or {}
    order = [s for s in STATUS_STYLES if s in by_status]
    order += sorted(s for s in by_status if s not in STATUS_STYLES)
    for status in order:
        table.add_row(status_text(status), f"{by_status[status]:,}")
    table.add_section()
    table.add_row(Text("total", style="bold"), f"{int(stats.get('executions') or 0):,}")
    rate = float(stats.get("failure_rate") or 0.0)
    table.add_row(
        Text("failure rate", style="bold"),
        Text(format_rate(rate), style="bold red" if rate > 0 else "green"),
    )
    if show_workflows and "workflow_runs" in stats:
        # Root runs: a workflow called from another is a part of its run, as its agents are.
        table.add_row("workflow runs (top level)", f"{int(stats['workflow_runs']):,}")
    return table


def latency_table(latency: Mapping[str, float | None]) -> Table:
    """p50, p95 and p99 of agent-call durations."""
    table = Table(title="Latency (agent calls)", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("p50", "p95", "p99"):
        table.add_column(name, justify="right")
    table.add_row(*(format_duration(latency.get(name)) for name in ("p50", "p95", "p99")))
    return table


def usage_table(tokens: Mapping[str, int], cost: float | None) -> Table:
    """Token totals and the total cost."""
    table = Table(title="Usage", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("prompt tokens", "completion tokens", "total tokens", "cost"):
        table.add_column(name, justify="right")
    table.add_row(
        format_tokens(tokens.get("prompt")),
        format_tokens(tokens.get("completion")),
        format_tokens(tokens.get("total")),
        cost_text(cost),
    )
    return table


def top_table(rows: Sequence[Mapping[str, Any]], by: str, *, limit: int = 5) -> Table:
    """The ``limit`` heaviest groups (agents or models) with their calls, failures and usage."""
    title = f"Top {'agents' if by == 'agent' else 'models' if by == 'model' else by}"
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column(by, overflow="ellipsis", max_width=40)
    table.add_column("calls", justify="right")
    table.add_column("failures", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("cost", justify="right")
    for row in _by_weight(rows)[:limit]:
        failures = int(row.get("failures") or 0)
        table.add_row(
            Text(shown(row.get(by))),
            f"{int(row.get('calls') or 0):,}",
            Text(f"{failures:,}", style="red" if failures else ""),
            format_tokens(row.get("total_tokens")),
            cost_text(row.get("cost_usd")),
        )
    if not rows:
        table.add_row(Text("none", style="dim"), "", "", "", "")
    return table


def stats_view(stats: Mapping[str, Any], *, agent: str | None = None) -> Group:
    """``EventStore.stats()`` as tables. With ``agent`` (stats filtered to that agent), the
    workflow-run count and the top-agents table, which say nothing about one agent, are left out."""
    parts: list[RenderableType] = [
        status_counts_table(stats, show_workflows=agent is None),
        latency_table(stats["latency_ms"]),
        usage_table(stats["tokens"], stats.get("cost_usd")),
    ]
    if agent is None:
        parts.append(top_table(stats.get("by_agent") or [], "agent"))
    parts.append(top_table(stats.get("by_model") or [], "model"))
    return Group(*parts)


# -- trace ------------------------------------------------------------------------------------


def _metrics_line(node: Mapping[str, Any]) -> Text:
    metrics = node.get("metrics") or {}
    kind = node.get("kind")
    pieces = [format_duration(node.get("duration_ms"))]
    if kind != "tool":
        tokens = int(metrics.get("total_tokens") or 0)
        pieces.append(
            f"{tokens:,} tok ({int(metrics.get('prompt_tokens') or 0):,} in / "
            f"{int(metrics.get('completion_tokens') or 0):,} out)"
            if tokens
            else "0 tok"
        )
        pieces.append(format_cost(metrics.get("total_cost")))
    if kind in ("workflow", "agent"):
        calls = int(metrics.get("llm_calls") or 0)
        pieces.append(f"{calls} llm call{'s' if calls != 1 else ''}")
        retries = int(metrics.get("retries") or 0)
        if retries:
            pieces.append(f"{retries} retr{'ies' if retries != 1 else 'y'}")
    return Text(" · ".join(pieces), style="dim")


def node_label(node: Mapping[str, Any], *, attempt: int | None = None) -> Text:
    """One span: kind, name, status, metrics, then its error on the next line."""
    kind = str(node.get("kind"))
    label = Text()
    label.append(
        shown(kind) if attempt is None else f"llm attempt {attempt}", KIND_STYLES.get(kind, "")
    )
    label.append(" ")
    label.append(shown(node.get("name")), style="bold")
    model = node.get("model")
    if model and kind == "agent":
        label.append(f" ({shown(model)})", style="dim")
    label.append("  ")
    label.append_text(status_text(str(node.get("status"))))
    label.append("  ")
    label.append_text(_metrics_line(node))
    error = node.get("error")
    if error:
        kind_of_error = node.get("error_type")
        said = f"{kind_of_error}: {error}" if kind_of_error else str(error)
        label.append("\n")
        label.append(excerpt(said, 160), style="red")
    return label


def event_label(event: Mapping[str, Any]) -> Text:
    """A recorded event: retry waits, breaker changes, fallbacks, rate-limit waits, ..."""
    name = shown(event.get("name"))
    raw = event.get("attributes")
    attrs: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    text = Text()
    if name == "retry_wait":
        text.append("↻ retry wait ", style="bold yellow")
        text.append(format_seconds(_number(attrs.get("wait"))))
        if attrs.get("attempt") is not None:
            text.append(f" after attempt {shown(attrs['attempt'])}")
        if attrs.get("retry_after") is not None:
            text.append(f" (Retry-After {shown(attrs['retry_after'])}s)", style="dim")
        if attrs.get("error"):
            text.append(f": {excerpt(str(attrs['error']), 120)}", style="dim")
    elif name == "breaker_state":
        new = str(attrs.get("new"))
        text.append("⚡ circuit breaker ", style="bold magenta")
        text.append(shown(attrs.get("breaker", "")))
        text.append(f": {shown(attrs.get('old'))} → ")
        text.append(
            shown(new), style="red" if new == "open" else "green" if new == "closed" else "yellow"
        )
    elif name == "fallback":
        text.append("↪ fallback", style="bold cyan")
        text.append(f": {shown(attrs.get('failed'))} failed")
        if attrs.get("next"):
            text.append(f", trying {shown(attrs['next'])}")
        if attrs.get("error"):
            text.append(f" ({excerpt(str(attrs['error']), 120)})", style="dim")
    elif name == "rate_limit_wait":
        text.append("⧗ rate limit wait ", style="bold yellow")
        text.append(format_seconds(_number(attrs.get("wait"))))
        if attrs.get("limiter"):
            text.append(f" ({shown(attrs['limiter'])})", style="dim")
    elif name == "retry_budget_exhausted":
        text.append("⛔ retry budget exhausted", style="bold red")
        if attrs.get("name"):
            text.append(f": {shown(attrs['name'])}", style="dim")
    else:
        text.append(f"• {name}", style="bold")
        if attrs:
            pairs = ", ".join(f"{k}={v}" for k, v in attrs.items())
            text.append(f" {excerpt(pairs, 120)}", style="dim")
    return text


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _timeline(node: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Children and events of ``node`` in the order they happened."""
    items: list[tuple[datetime | None, int, str, Mapping[str, Any]]] = []
    for child in node.get("children") or []:
        items.append((child.get("started_at"), 0, "span", child))
    for event in node.get("events") or []:
        items.append((event.get("at"), 1, "event", event))

    def key(item: tuple[datetime | None, int, str, Mapping[str, Any]]) -> tuple[float, int]:
        when = item[0]
        return (when.timestamp() if when is not None else float("-inf"), item[1])

    items.sort(key=key)
    return [(what, value) for _, _, what, value in items]


def _where(node: Mapping[str, Any]) -> tuple[Any, Any]:
    return node.get("host"), node.get("pid")


def _processes(node: Mapping[str, Any]) -> set[tuple[Any, Any]]:
    found = {_where(node)}
    for child in node.get("children") or []:
        found |= _processes(child)
    return found


def _with_where(label: Text, node: Mapping[str, Any]) -> Text:
    host, pid = _where(node)
    label.append(f"  on {shown(host)} pid {shown(pid)}", style="dim")
    return label


def _grow(tree: Tree, node: Mapping[str, Any], show_where: bool) -> None:
    attempt = 0
    for what, item in _timeline(node):
        if what == "event":
            tree.add(event_label(item))
            continue
        if item.get("kind") == "llm":
            attempt += 1
            label = node_label(item, attempt=attempt)
        else:
            label = node_label(item)
        # Where a span ran, when it is not where its parent ran (a kagura.ray worker).
        if show_where and _where(item) != _where(node):
            label = _with_where(label, item)
        _grow(tree.add(label), item, show_where)


def trace_tree(execution: Mapping[str, Any]) -> Tree:
    """An execution from ``EventStore.get_execution()``: every span with its timing, tokens,
    cost, status and error, and each span's events where they happened among its children.
    When the spans of the tree were recorded by more than one process (a run on a Ray cluster),
    the root and every span that ran in another process than its parent say which host and
    process ran them."""
    show_where = len(_processes(execution)) > 1
    label = node_label(execution)
    tree = Tree(_with_where(label, execution) if show_where else label, guide_style="dim")
    _grow(tree, execution, show_where)
    return tree


def trace_header(execution: Mapping[str, Any]) -> Text:
    text = Text()
    text.append(f"{shown(execution.get('kind'))} {shown(execution.get('id'))}", style="bold")
    text.append(f"  started {format_time(execution.get('started_at'))}", style="dim")
    ended = execution.get("ended_at")
    if ended is not None and execution.get("status") == "interrupted":
        # When its death was noticed, not when it ended: that is not known.
        text.append(f", found interrupted {format_time(ended)}", style="dim")
    elif ended is not None:
        text.append(f", ended {format_time(ended)}", style="dim")
    if execution.get("parent_id"):
        text.append(
            f"\npart of run {shown(execution.get('run_id'))} "
            f"(parent {shown(execution.get('parent_id'))})",
            style="dim",
        )
    return text


# -- cost -------------------------------------------------------------------------------------


def cost_table(
    rows: Sequence[Mapping[str, Any]],
    by: str,
    spent: Sequence[Mapping[str, Any]] | None = None,
) -> Table:
    """``EventStore.cost(by=...)`` rows with a total row. An agent's row counts the tokens and
    cost of the agents it called (as tools, say) too, so rows by agent do not add up to what
    was spent: their total's tokens and cost are then ``spent``'s, rows by model (LLM
    attempts, each counted once)."""
    table = Table(
        title=f"Cost by {by}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        show_footer=len(rows) > 1,
    )
    calls = sum(int(r.get("calls") or 0) for r in rows)
    failures = sum(int(r.get("failures") or 0) for r in rows)
    summed = rows if spent is None else spent
    costs = [r.get("cost_usd") for r in summed]
    total_cost = None if any(c is None for c in costs) else float(sum(c or 0.0 for c in costs))

    def total(field: str) -> str:
        return format_tokens(sum(int(r.get(field) or 0) for r in summed))

    table.add_column(by, footer="total", overflow="ellipsis", max_width=40)
    table.add_column("calls", justify="right", footer=f"{calls:,}")
    table.add_column("failures", justify="right", footer=f"{failures:,}")
    table.add_column("prompt tokens", justify="right", footer=total("prompt_tokens"))
    table.add_column("completion tokens", justify="right", footer=total("completion_tokens"))
    table.add_column("total tokens", justify="right", footer=total("total_tokens"))
    table.add_column("cost", justify="right", footer=format_cost(total_cost))
    for row in rows:
        failed = int(row.get("failures") or 0)
        table.add_row(
            Text(shown(row.get(by))),
            f"{int(row.get('calls') or 0):,}",
            Text(f"{failed:,}", style="red" if failed else ""),
            format_tokens(row.get("prompt_tokens")),
            format_tokens(row.get("completion_tokens")),
            format_tokens(row.get("total_tokens")),
            cost_text(row.get("cost_usd")),
        )
    return table


def fill_days(rows: Sequence[Mapping[str, Any]], *, max_days: int = 366) -> list[Mapping[str, Any]]:
    """Rows by day with the days that had no calls added as zero rows, so a chart of days reads
    as a time line (unless the range is longer than ``max_days``)."""
    known = {str(r.get("day")): r for r in rows}
    try:
        days = sorted(date.fromisoformat(d) for d in known)
    except ValueError:
        return list(rows)
    if not days or (days[-1] - days[0]).days >= max_days:
        return list(rows)
    filled: list[Mapping[str, Any]] = []
    day = days[0]
    while day <= days[-1]:
        key = day.isoformat()
        filled.append(
            known.get(key)
            or {
                "day": key,
                "calls": 0,
                "failures": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "cost_usd": 0.0,
            }
        )
        day += timedelta(days=1)
    return filled


def chart_metric(rows: Sequence[Mapping[str, Any]]) -> str:
    """``cost_usd`` when some group has a known non-zero cost, else ``total_tokens``."""
    return "cost_usd" if any((r.get("cost_usd") or 0) > 0 for r in rows) else "total_tokens"


def chart_title(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """What the chart shows, and why tokens when it shows tokens. A group's cost is unknown
    when one of its calls had no known price, however many others had one: so the title says
    that some calls' cost is unknown, never that no call has a cost."""
    unknown = any(r.get("cost_usd") is None for r in rows)
    if metric == "cost_usd":
        return "Cost (USD; some calls' cost is unknown)" if unknown else "Cost (USD)"
    if unknown:
        return "Tokens (some calls' cost is unknown)"
    return "Tokens (no call has a non-zero cost)"


def cost_chart(rows: Sequence[Mapping[str, Any]], by: str, *, width: int = 40) -> Table:
    """A horizontal bar per group (per day, in order, for ``by="day"``) of its cost, or of its
    tokens when no group has a known, non-zero cost; a group of unknown cost gets no bar."""
    metric = chart_metric(rows)
    what = chart_title(rows, metric)
    table = Table(
        title=f"{what} by {by}",
        box=None,
        show_header=False,
        title_justify="left",
        padding=(0, 1),
    )
    table.add_column(by, no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("bar", no_wrap=True, min_width=width, max_width=width)
    table.add_column("value", justify="right", no_wrap=True)
    values = [_number(r.get(metric)) for r in rows]
    maximum = max((v for v in values if v is not None), default=0.0)
    for row, value in zip(rows, values, strict=True):
        figure = format_cost(value) if metric == "cost_usd" else format_tokens(int(value or 0))
        table.add_row(
            Text(shown(row.get(by))),
            Text(
                bar(value or 0.0, maximum, width), style="green" if metric == "cost_usd" else "cyan"
            ),
            Text(figure, style="dim italic" if value is None else ""),
        )
    return table


# -- live -------------------------------------------------------------------------------------


def summary_line(stats: Mapping[str, Any], window: str) -> Text:
    """One line: agent calls by status, failure rate, p50/p95, tokens and cost in the window."""
    by_status: Mapping[str, int] = stats.get("by_status") or {}
    text = Text()
    text.append(f"{window}: ", style="bold")
    text.append(f"{int(stats.get('executions') or 0):,} agent calls")
    for status in STATUS_STYLES:
        if by_status.get(status):
            text.append("  ")
            text.append(f"{by_status[status]:,} {shown(status)}", style=STATUS_STYLES[status])
    rate = float(stats.get("failure_rate") or 0.0)
    text.append("  failure rate ")
    text.append(format_rate(rate), style="bold red" if rate > 0 else "green")
    latency = stats.get("latency_ms") or {}
    text.append(
        f"  p50 {format_duration(latency.get('p50'))}  p95 {format_duration(latency.get('p95'))}"
    )
    tokens = (stats.get("tokens") or {}).get("total")
    text.append(f"  {format_tokens(tokens)} tokens  {format_cost(stats.get('cost_usd'))}")
    return text


def latency_line(durations_ms: Sequence[float | None], *, width: int = 60) -> Text:
    """A sparkline of recent agent-call latencies (oldest first) with their range."""
    points = [d for d in durations_ms if d is not None][-width:]
    text = Text()
    text.append("latency ", style="bold")
    if not points:
        text.append("no finished agent calls yet", style="dim")
        return text
    text.append(sparkline(points), style="cyan")
    text.append(
        f"  last {len(points)} agent calls, {format_duration(min(points))} – "
        f"{format_duration(max(points))}",
        style="dim",
    )
    return text


def live_view(
    executions: Sequence[Mapping[str, Any]],
    stats: Mapping[str, Any] | None,
    durations_ms: Sequence[float | None],
    *,
    window: str,
    footer: str = "",
    note: str | None = None,
    width: int | None = None,
) -> Group:
    """The ``monitor live`` screen: summary, latency sparkline, then the latest executions."""
    parts: list[RenderableType] = []
    if note:
        parts.append(Text(note, style="yellow"))
    if stats is not None:
        parts.append(summary_line(stats, window))
    parts.append(latency_line(durations_ms))
    parts.append(executions_table(executions, title="Latest executions", width=width))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)
