"""A rich table that fits the terminal by leaving out its least useful columns.

Shared by ``kagura monitor`` (executions) and ``kagura runs`` (durable runs): each keeps its own
columns; this module decides which of them fit and how wide the error excerpt may be, and
formats the values both show (times, durations, excerpts) the same way.

What the store holds was written by agents, models and the code that named them, so it is shown
through :func:`visible`: an escape sequence in a model's output or an error must not reach the
terminal as one (rich takes out a few control characters, not ESC).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from rich import box
from rich.table import Table
from rich.text import Text

from ._checks import obeyed

ERROR = "error"
DASH = "—"

#: How a status is shown, the same for an execution (``kagura monitor``) as for a durable run
#: (``kagura runs``, whose statuses are running, completed, failed and interrupted). In this
#: order in the monitor's summaries.
STATUS_STYLES = {
    "completed": "green",
    "failed": "bold red",
    "timed_out": "red",
    "cancelled": "yellow",
    # Its process died (or its lease ran out, or its run was taken over) before it ended.
    "interrupted": "bold yellow",
    "running": "cyan",
}
STATUS_ICONS = {
    "completed": "✓",
    "failed": "✗",
    "timed_out": "⏱",
    "cancelled": "⊘",
    "interrupted": "↯",
    "running": "…",
}


def table_width(widths: Sequence[int]) -> int:
    """The width of a table with columns this wide (gaps of 2, edges of 1)."""
    return sum(widths) + 2 * (len(widths) - 1) + 2


@dataclass(frozen=True)
class FittedTable:
    """Columns as ``(name, "left" | "right")``, the order in which a narrow terminal drops
    them, the widest each may be, and the fewest cells the ``error`` column keeps."""

    columns: tuple[tuple[str, str], ...]
    drop_order: tuple[str, ...]
    max_widths: Mapping[str, int]
    min_error_width: int

    def needed(self, name: str, rows: Sequence[Mapping[str, Text]]) -> int:
        """The cells column ``name`` takes: its widest cell or header, up to its limit (the
        error column: a short excerpt, the rest of its text being what is left over)."""
        widest = max([len(name), *(row[name].cell_len for row in rows)])
        if name == ERROR:
            return min(widest, self.min_error_width)
        return min(widest, self.max_widths.get(name, widest))

    def fit(self, rows: Sequence[Mapping[str, Text]], width: int | None) -> list[str]:
        """The columns that fit in ``width`` cells: the least useful go first, and the error
        column keeps at least a short excerpt or goes too. It is left out when no row has an
        error: drawn empty, its header alone would squeeze every other column."""
        names = [name for name, _ in self.columns]
        if not any(row[ERROR].plain for row in rows):
            names.remove(ERROR)
        if width is None:
            return names
        fitted = self._drop(names, rows, width)
        if ERROR in fitted and table_width([self.needed(n, rows) for n in fitted]) > width:
            # Not even the excerpt fits beside the columns that are never dropped: the error
            # goes rather than every id being cut short (`kagura monitor trace` and `kagura
            # runs show` take whole ids, and show the error), and columns it displaced return.
            fitted = self._drop([n for n in names if n != ERROR], rows, width)
        return fitted

    def _drop(self, names: list[str], rows: Sequence[Mapping[str, Text]], width: int) -> list[str]:
        """``names`` less the least useful, until they fit in ``width`` or none is left to go."""
        names = list(names)
        for name in self.drop_order:
            if table_width([self.needed(n, rows) for n in names]) <= width:
                break
            names.remove(name)
        return names

    def table(
        self, rows: Sequence[Mapping[str, Text]], *, title: str | None, width: int | None
    ) -> Table:
        """The rows (cells by column) as a table. With ``width`` (the terminal's), the least
        useful columns are left out rather than every column squeezed, and the error excerpt
        takes what the other columns leave."""
        columns = self.fit(rows, width)
        table = Table(
            title=title,
            box=box.SIMPLE_HEAD,
            header_style="bold",
            title_justify="left",
            collapse_padding=True,
            pad_edge=False,
        )
        justify = dict(self.columns)
        limits = dict(self.max_widths)
        if width is not None and ERROR in columns:
            # The error excerpt takes what the other columns leave, so they are never squeezed.
            others = [self.needed(c, rows) for c in columns if c != ERROR]
            # fit() kept the column only if its short excerpt fits, so this is never less.
            room = width - table_width([*others, 0])
            limits[ERROR] = min(limits[ERROR], room)
        for name in columns:
            table.add_column(
                name,
                justify="right" if justify[name] == "right" else "left",
                no_wrap=True,
                overflow="ellipsis",
                max_width=limits.get(name),
            )
        for row in rows:
            table.add_row(*(row[name] for name in columns))
        return table


def status_text(status: str) -> Text:
    """The status, coloured, with an icon."""
    icon = STATUS_ICONS.get(status, "?")
    return Text(f"{icon} {visible(status)}", style=STATUS_STYLES.get(status, ""))


def error_excerpt(error: object, error_type: object, width: int = 60) -> str:
    """``ErrorType: message`` on one line, cut to ``width``; empty when there is no error."""
    if not error:
        return ""
    return excerpt(f"{error_type}: {error}" if error_type else str(error), width)


def format_duration(ms: float | None) -> str:
    """``0.08 ms``, ``12 ms``, ``1.25 s``, ``2m 05s``, ``1h 02m``; a dash when not finished."""
    if ms is None:
        return DASH
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_seconds(seconds: float | None) -> str:
    return DASH if seconds is None else format_duration(seconds * 1000)


def format_time(when: datetime | None) -> str:
    """Local time, to the second."""
    if when is None:
        return DASH
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_when(when: datetime | None, *, now: datetime | None = None) -> str:
    """Local time, short: ``14:03:07`` today, ``06-01 14:03`` this year, else the date."""
    if when is None:
        return DASH
    local = when.astimezone()
    now = (now or datetime.now()).astimezone()
    if local.date() == now.date():
        return local.strftime("%H:%M:%S")
    if local.year == now.year:
        return local.strftime("%m-%d %H:%M")
    return local.strftime("%Y-%m-%d")


def visible(text: str, *, keep: str = "") -> str:
    """``text`` with the characters a terminal would obey (see :func:`~kagura._checks.obeyed`;
    but those in ``keep``) written as escapes (``\\x1b``, ``\\n``, ``\\u202e``): an escape
    sequence cannot clear the screen or write the clipboard, a newline cannot split a table's
    row, a right-to-left override cannot make one name read as another."""
    if text.isprintable():  # none of them, and the usual case
        return text
    return "".join(
        c.encode("unicode_escape").decode() if c not in keep and obeyed(c) else c for c in text
    )


def excerpt(text: str | None, width: int = 60) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis (its control and
    format characters shown as escapes: see :func:`visible`)."""
    if not text:
        return ""
    line = visible(" ".join(text.split()))
    return line if len(line) <= width else line[: width - 1] + "…"
