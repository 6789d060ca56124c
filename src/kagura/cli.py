"""The ``kagura`` command line.

``kagura monitor list|stats|trace|cost|live`` reads what agents and workflows recorded in the
event store; ``kagura runs list|show|resume|recover|prune`` lists the durable workflow runs
journaled there, finishes interrupted or failed ones (one by id, or every interrupted run,
this host's by default) and deletes those that ended before a given time; ``kagura keygen``
prints a new key for ``KAGURA_ENCRYPTION_KEY``. Each command group is added by one
``_add_<group>`` function.
Importing this module stays cheap: rich, SQLAlchemy, the store and the durable machinery are
imported inside the commands.

Exit codes: 0 on success, 1 on user errors (a bad ``--since``, an unknown id, an unreadable
store, encrypted values and no key that decrypts them), 2 on command-line syntax errors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from .durable import Journal, RunRecord
    from .observability import EventStore

__all__ = ["main"]

STATUSES = ("running", "completed", "failed", "cancelled", "timed_out", "interrupted")
KINDS = ("agent", "workflow", "llm", "tool")
GROUPS = ("agent", "model", "day")
RUN_STATUSES = ("running", "completed", "failed", "interrupted")

_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SINCE_HELP = (
    "only executions started since then: a duration back from now (90s, 30m, 1h, 2d, 1w) or an "
    "ISO date/time (2025-06-01, 2025-06-01T09:00; local time unless it names a zone)"
)


_sleep = time.sleep  # between live refreshes (tests replace it)


class CliError(Exception):
    """A user error: reported on stderr as ``kagura: error: ...``, exit code 1."""


Handler = Callable[[argparse.Namespace], int]

# -- helpers ----------------------------------------------------------------------------------


def parse_since(text: str, *, now: datetime | None = None, option: str = "--since") -> datetime:
    """``30m``, ``1h``, ``2d``, ``1w``, ``90s`` back from ``now``, or an ISO date/time (the value
    of ``option``, which an error names)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if match:
        now = now or datetime.now().astimezone()
        try:
            return now - timedelta(seconds=float(match.group(1)) * _SINCE_UNITS[match.group(2)])
        except OverflowError:
            raise CliError(
                f"{option}: {text.strip()!r} goes back before the first year a date can name; "
                "give a shorter duration, or a date"
            ) from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"{option}: expected a duration such as 30m, 1h or 2d, or an ISO date/time such as "
            f"2025-06-01T09:00, got {text!r}"
        ) from None
    if when.tzinfo is not None:
        return when
    try:
        return when.astimezone()
    except (OverflowError, ValueError):  # 0001-01-01 in local time falls before the year 1
        raise CliError(
            f"{option}: {text.strip()!r} is too close to the first year a date can name; give "
            f"a later date, or one with its time zone (2025-06-01T09:00+00:00)"
        ) from None


def _since(args: argparse.Namespace) -> datetime | None:
    text: str | None = getattr(args, "since", None)
    return None if text is None else parse_since(text)


def _window(args: argparse.Namespace) -> str:
    text: str | None = getattr(args, "since", None)
    return "all time" if text is None else f"since {text}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    if value > _MOST:
        raise argparse.ArgumentTypeError(f"expected a number of at most {_MOST:,}, got {value}")
    return value


#: The largest count an option takes: what a database's 64-bit integer holds.
_MOST = 2**63 - 1


#: The longest wait an option takes, in seconds: a day. (time.sleep refuses what does not fit
#: its C types, inf and 1e20 among them, with an OverflowError; nobody means a longer wait.)
_LONGEST_WAIT = 86_400.0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= _LONGEST_WAIT:  # NaN too
        raise argparse.ArgumentTypeError(
            f"expected more than 0 seconds and at most {_LONGEST_WAIT:g} (a day), got {text}"
        )
    return value


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (if any) masked: messages never show it."""
    from ._storage import scrub_url

    return scrub_url(text, url)


def _store_name(store: EventStore) -> str:
    from ._storage import store_name

    return store_name(store.url)


def _open_store(args: argparse.Namespace, *, required: bool = False) -> EventStore | None:
    """The store named by ``--db`` (else the default one), or ``None`` when nothing has been
    recorded yet. A ``--db`` SQLite file that does not exist is an error: it is not created."""
    from .observability import EventStore

    store = EventStore(args.db) if args.db else EventStore()
    if _nothing_there(store.url, given=bool(args.db) or required):
        print(
            f"Nothing recorded yet: {_no_store(store.url)}. Agents and workflows record there "
            "when they run (set KAGURA_DB to record elsewhere).",
            file=sys.stderr,
        )
        return None
    return store


def _nothing_there(url: str, *, given: bool) -> bool:
    """Whether the store at ``url`` is not there yet, or holds none of Kagura's tables (an empty
    file, a database nothing has recorded to): a command that only reads says so rather than
    make the store. An error where the store was ``given`` (``--db``, or a run asked for)."""
    from ._storage import holds_no_store, sqlite_path

    file = sqlite_path(url)
    path = None if file is None else Path(file)
    if path is not None and path.exists():
        _refuse_foreign(path)
    if (path is None or path.exists()) and not holds_no_store(url):
        return False
    if given:
        raise CliError(_no_store(url))
    return True


def _no_store(url: str) -> str:
    from ._storage import sqlite_path, store_name

    file = sqlite_path(url)
    path = None if file is None else Path(file)
    if path is not None and not path.exists():
        return f"no event store at {path}"
    return f"no Kagura event store in {store_name(url)} (none of Kagura's tables are there)"


def _refuse_foreign(path: Path) -> None:
    """A SQLite file of another program's, given as the store: said, rather than given
    Kagura's tables by a command that only reads."""
    from ._storage import foreign_tables, normalise_url

    foreign = foreign_tables(normalise_url(path))
    if foreign:
        raise CliError(
            f"{path} is not a Kagura event store: it holds other tables "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}) and none of "
            f"Kagura's; give --db (or KAGURA_DB) the file Kagura records to"
        )


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def _plain(line: str, style: str = "") -> Text:
    """A line of the commands' own that quotes what users typed or stored (a store's path, an
    agent's name): never read as rich markup (a path with "[/x]" in it failed the command, one
    with "[prod]" lost it), the characters a terminal would obey shown as escapes."""
    from rich.text import Text

    from ._table import visible

    return Text(visible(line), style=style)


def _chart_width(console: Console) -> int:
    return max(10, min(60, console.width - 50))


# -- monitor commands -------------------------------------------------------------------------


def _monitor_list(args: argparse.Namespace) -> int:
    from .observability import _monitor

    since = _since(args)
    store = _open_store(args)
    if store is None:
        return 0
    from .observability._store import EXECUTION_KINDS

    kinds: Sequence[str] = args.kind or EXECUTION_KINDS
    executions = store.get_executions(
        args.agent, status=args.status, since=since, kind=kinds, limit=args.limit
    )
    console = _console()
    if not executions:
        console.print(_plain(f"No executions found ({_window(args)}) in {_store_name(store)}."))
        return 0
    table = _monitor.executions_table(executions, width=console.width)
    table.caption = _plain(f"{len(executions)} shown, newest first · {_store_name(store)}")
    console.print(table)
    return 0


def _monitor_stats(args: argparse.Namespace) -> int:

    from .observability import _monitor

    since = _since(args)
    store = _open_store(args)
    if store is None:
        return 0
    stats = store.stats(since=since, agent_name=args.agent)
    console = _console()
    who = f"agent {args.agent}" if args.agent else "all agents"
    console.print(_plain(f"Stats for {who}, {_window(args)} · {_store_name(store)}", style="bold"))
    console.print(_monitor.stats_view(stats, agent=args.agent))
    return 0


def _resolve_id(store: EventStore, given: str) -> dict[str, Any]:
    """The execution with id ``given``, or the one whose id starts with it."""
    execution = store.get_execution(given)
    if execution is not None:
        return execution
    matches = store.find_ids(given, limit=6) if given else []
    if not matches:
        raise CliError(f"no execution with id {given!r} in {_store_name(store)}")
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise CliError(f"id prefix {given!r} matches several executions: {shown}")
    execution = store.get_execution(matches[0])
    if execution is None:  # deleted in between
        raise CliError(f"no execution with id {given!r} in {_store_name(store)}")
    return execution


def _monitor_trace(args: argparse.Namespace) -> int:
    from .observability import _monitor

    store = _open_store(args, required=True)
    assert store is not None
    execution = _resolve_id(store, args.id.strip())
    console = _console()
    console.print(_monitor.trace_header(execution))
    console.print(_monitor.trace_tree(execution))
    return 0


def _monitor_cost(args: argparse.Namespace) -> int:
    from .observability import _monitor

    since = _since(args)
    store = _open_store(args)
    if store is None:
        return 0
    rows = store.cost(by=args.by, since=since)
    console = _console()
    if not rows:
        console.print(_plain(f"No finished calls ({_window(args)}) in {_store_name(store)}."))
        return 0
    # By agent, an agent's row holds the agents it called: what was spent is the attempts'.
    spent = store.cost(by="model", since=since) if args.by == "agent" else None
    table = _monitor.cost_table(rows, args.by, spent)
    caption = f"{_window(args)} · {_store_name(store)}"
    if spent is not None:
        caption += " · an agent's row includes the agents it called"
    table.caption = _plain(caption)
    console.print(table)
    chart_rows = _monitor.fill_days(rows) if args.by == "day" else rows
    console.print(_monitor.cost_chart(chart_rows, args.by, width=_chart_width(console)))
    return 0


def _monitor_live(args: argparse.Namespace) -> int:
    from rich.live import Live

    since_text: str = args.since
    parse_since(since_text)  # a bad --since fails before the screen opens
    console = _console()
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            count = 0
            while True:
                count += 1
                live.update(_live_frame(args, since_text, console.width), refresh=True)
                if args.iterations is not None and count >= args.iterations:
                    break
                _sleep(args.interval)
    except KeyboardInterrupt:
        pass
    if not console.is_terminal:
        console.line()  # a file or pipe got the last frame without its final newline
    return 0


#: Stores ``kagura monitor live`` has found there (with Kagura's tables).
_live_stores: set[str] = set()


def _live_frame(args: argparse.Namespace, since_text: str, width: int) -> Any:
    from .observability import EventStore, _monitor

    store = EventStore(args.db) if args.db else EventStore()
    footer = (
        f"{_store_name(store)} · every {args.interval:g}s · "
        f"{datetime.now().strftime('%H:%M:%S')} · Ctrl-C to quit"
    )
    # Asked until the store is there: its tables stay, and every frame would connect once more.
    if store.url not in _live_stores:
        if _nothing_there(store.url, given=False):
            note = f"Waiting for recordings: {_no_store(store.url)} yet."
            return _monitor.live_view(
                [], None, [], window="", footer=footer, note=note, width=width
            )
        _live_stores.add(store.url)
    executions = store.get_executions(limit=args.limit)
    stats = store.stats(since=parse_since(since_text))
    # Calls that ended: a running or interrupted one has no duration (its end is not known).
    ended = [s for s in STATUSES if s not in ("running", "interrupted")]
    recent = store.get_executions(kind="agent", status=ended, limit=60)
    durations = [e["duration_ms"] for e in reversed(recent)]
    return _monitor.live_view(
        executions, stats, durations, window=f"last {since_text}", footer=footer, width=width
    )


# -- runs commands ----------------------------------------------------------------------------


def _runs_store(args: argparse.Namespace, *, required: bool = False) -> str | None:
    """Point this process at the store named by ``--db`` (``KAGURA_DB``, set before anything
    opens it, so a resumed workflow journals there too) and return its URL; ``None`` when
    nothing has been recorded yet. A ``--db`` SQLite file that does not exist is an error."""
    from ._storage import default_url

    if args.db:
        os.environ["KAGURA_DB"] = args.db
    url = default_url()
    if _nothing_there(url, given=bool(args.db) or required):
        print(
            f"No durable runs yet: {_no_store(url)}. Durable workflows journal there when they "
            "run (set KAGURA_DB to use another store).",
            file=sys.stderr,
        )
        return None
    return url


def _find_run_ids(journal: Journal, prefix: str, limit: int = 6) -> list[str]:
    """Ids of runs that start with ``prefix`` (at most ``limit``), for ids typed short."""
    from sqlalchemy import select

    from ._storage import runs

    query = (
        select(runs.c.run_id)
        .where(runs.c.run_id.startswith(prefix, autoescape=True))
        .order_by(runs.c.run_id)
        .limit(limit)
    )
    with journal.engine.connect() as connection:
        return [str(run_id) for run_id in connection.execute(query).scalars()]


def _resolve_run(journal: Journal, given: str) -> RunRecord:
    """The run with id ``given``, or the one whose id starts with it."""
    from ._storage import store_name

    record = journal.get_run(given)
    if record is not None:
        return record
    matches = _find_run_ids(journal, given) if given else []
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise CliError(f"run id prefix {given!r} matches several runs: {shown}")
    record = journal.get_run(matches[0]) if matches else None
    if record is None:
        raise CliError(f"no durable run with id {given!r} in {store_name(journal.url)}")
    return record


def _runs_list(args: argparse.Namespace) -> int:
    from ._storage import store_name
    from .durable import _views, journal_for

    url = _runs_store(args)
    if url is None:
        return 0
    records = journal_for(url).list_runs(
        status=args.status, workflow=args.workflow, limit=args.limit
    )
    console = _console()
    if not records:
        what = " ".join(
            part
            for part in (
                args.status,
                "durable runs",
                f"of workflow {args.workflow!r}" if args.workflow else "",
            )
            if part
        )
        console.print(_plain(f"No {what} in {store_name(url)}."))
        return 0
    table = _views.runs_table(records, width=console.width)
    table.caption = _plain(
        f"{len(records)} shown, most recently updated first · interrupted = its process is "
        "gone, or its lease (its holder's KAGURA_LEASE_SECONDS) ran out · "
        f"{store_name(url)}"
    )
    console.print(table)
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    from .durable import _views, journal_for, lease_seconds

    url = _runs_store(args, required=True)
    journal = journal_for(url)
    record = _resolve_run(journal, args.id.strip())
    steps = journal.load_steps(record.run_id)
    console = _console()
    console.print(_views.run_view(record, steps, lease_seconds(), width=console.width))
    return 0


def _format_result(result: Any, *, terminal: bool = False) -> str:
    """A workflow's result as text: strings as they are, anything else as indented JSON. For a
    ``terminal``, the characters it would obey but line ends and tabs are written as escapes
    (see :func:`kagura._table.visible`): a model's output in it must not clear the screen or
    write the clipboard. A pipe or file gets the result as it is: that is data, for a program
    to read."""
    from ._table import visible

    if isinstance(result, str):
        text = result
    else:
        import pydantic_core

        text = pydantic_core.to_json(result, indent=2, fallback=repr).decode()
    return visible(text.replace("\r\n", "\n"), keep="\n\t") if terminal else text


def _import_workflow(record: RunRecord) -> Any:
    """The workflow object the run recorded as its target, imported in this process."""
    from .durable._execute import import_target

    if not record.target:
        raise CliError(f"run {record.run_id!r} does not record where its workflow is defined")
    # Like `python -m`, look in the current directory first: that is where projects keep the
    # module a target such as "app.workflows:report" names.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return import_target(record.target)
    except Exception as error:
        raise CliError(
            f"cannot import the workflow of run {record.run_id!r} from {record.target!r}: "
            f"{type(error).__name__}: {error}"
        ) from error


def _runs_resume(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console
    from rich.text import Text

    from ._redact import str_of
    from ._table import visible
    from .durable import journal_for, resume_run
    from .durable._views import count_steps
    from .errors import RunInProgressError, StoreError, UsageError

    url = _runs_store(args, required=True)
    journal = journal_for(url)
    record = _resolve_run(journal, args.id.strip())
    workflow = _import_workflow(record)
    # What it did goes to stderr: stdout holds the result alone, for a program to read.
    console = Console(highlight=False, stderr=True)
    if record.status != "completed":
        console.print(
            Text(
                visible(
                    f"Resuming run {record.run_id} ({record.status}, "
                    f"{count_steps(record.steps)} journaled, attempt {record.attempts + 1}) "
                    f"of workflow {record.workflow} from {record.target}"
                )
            )
        )
    try:
        resumed = asyncio.run(resume_run(workflow, record.run_id))
    except (RunInProgressError, UsageError, StoreError) as error:
        raise CliError(str(error)) from error
    except Exception as error:
        if _is_store_error(error):
            raise
        raise CliError(
            f"run {record.run_id!r} failed again: {type(error).__name__}: {str_of(error)} "
            f"(see: kagura runs show {record.run_id})"
        ) from error
    if resumed.already_completed:
        console.print(
            Text(visible(f"Run {record.run_id} has already completed; its recorded result:"))
        )
    else:
        # What this resume did, counted as it happened: not the journal's size before it.
        console.print(
            Text(
                visible(
                    f"Run {record.run_id} completed: {count_steps(resumed.replayed)} came from "
                    f"the journal (not run again), {resumed.ran} ran now."
                ),
                style="green",
            )
        )
    print(_format_result(resumed.result, terminal=sys.stdout.isatty()))
    return 0


def _runs_recover(args: argparse.Namespace) -> int:
    import asyncio

    from ._process import HOST
    from .durable import _views, recover

    url = _runs_store(args)
    if url is None:
        return 0
    # Like `python -m`, look in the current directory first for the modules targets name.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    outcomes = asyncio.run(recover(all_hosts=args.all_hosts, concurrency=args.concurrency))
    console = _console()
    where = "any host" if args.all_hosts else f"this host ({HOST})"
    if not outcomes:
        console.print(_plain(f"No interrupted durable runs of {where} to recover."))
        return 0
    console.print(_views.recovered_table(outcomes, width=console.width))
    bad = [o for o in outcomes if o.outcome in ("failed", "unloadable")]
    return 1 if bad else 0


def _runs_prune(args: argparse.Namespace) -> int:
    from ._storage import store_name
    from .durable import journal_for

    cutoff = parse_since(args.older_than, option="--older-than")
    if cutoff > datetime.now().astimezone():
        # A typo for a date in the past (2099 for 2009), most likely: it would delete every
        # run that has ended, with no way back. A duration says "everything so far" plainly.
        raise CliError(
            f"--older-than: {args.older_than.strip()!r} is later than now, which would delete "
            "every run that has ended; give a time in the past, or a duration back from now "
            "(30d; 0s: every run that has ended so far)"
        )
    url = _runs_store(args)
    if url is None:
        return 0
    deleted = journal_for(url).delete_older_than(cutoff)
    when = cutoff.strftime("%Y-%m-%d %H:%M %Z").strip()
    _console().print(
        f"Deleted {deleted:,} durable run{'' if deleted == 1 else 's'} that ended (completed "
        f"or failed) before {when}, with their steps, from {store_name(url)}. Running and "
        "interrupted runs are kept."
    )
    return 0


# -- keygen -----------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from ._encryption import ENV, generate_key

    # Only the key on stdout, so that `export KAGURA_ENCRYPTION_KEY=$(kagura keygen)` works; the
    # advice on stderr, without the key (stderr tends to end up in logs).
    print(generate_key())
    print(
        f"kagura: a new key for {ENV}. Every process that records, journals or reads the store "
        f"needs it; without it, what was encrypted cannot be read: keep it safe.\n"
        f"kagura: to rotate keys, put the new key first and keep the old ones after it, "
        f"comma-separated: {ENV}=<new key>,<old key> (the first encrypts, every one decrypts).",
        file=sys.stderr,
    )
    return 0


def _add_keygen(commands: Any) -> None:
    keygen = commands.add_parser(
        "keygen",
        help="print a new key for KAGURA_ENCRYPTION_KEY",
        description="Print a new random key for KAGURA_ENCRYPTION_KEY on stdout, and nothing "
        "else there: export KAGURA_ENCRYPTION_KEY=$(kagura keygen). With a key set, recorded "
        "prompts, outputs, arguments and error texts and the durable journal's payloads are "
        "encrypted in the store (needs the cryptography package: pip install "
        "'kagura[encryption]'). Several keys, comma-separated: the first encrypts, every one "
        "decrypts.",
    )
    keygen.set_defaults(handler=_keygen)


# -- the parser -------------------------------------------------------------------------------


def _store_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="PATH_OR_URL",
        help="the event store: a SQLite file or a postgresql:// URL "
        "(default: $KAGURA_DB, else $KAGURA_HOME/events.db, i.e. ~/.kagura/events.db)",
    )
    return common


def _add_monitor(commands: Any) -> None:
    monitor = commands.add_parser(
        "monitor",
        help="inspect recorded executions: list, stats, trace, cost, live",
        description="Inspect what agents and workflows recorded in the event store: every "
        "workflow run, agent call, LLM attempt and tool call with its timing, tokens, cost and "
        "errors.",
    )
    monitor.set_defaults(handler=None, group_parser=monitor)
    sub = monitor.add_subparsers(title="commands", metavar="COMMAND")
    common = _store_options()
    formatter = argparse.RawDescriptionHelpFormatter

    listing = sub.add_parser(
        "list",
        parents=[common],
        help="a table of recent executions",
        description="Recent executions, newest first: workflow runs and agent calls by default.",
        epilog="examples:\n  kagura monitor list --status failed --since 1h\n"
        "  kagura monitor list --agent summarise --limit 100\n"
        "  kagura monitor list --kind llm",
        formatter_class=formatter,
    )
    listing.add_argument("--agent", metavar="NAME", help="only this agent or workflow")
    listing.add_argument(
        "--status",
        action="append",
        choices=STATUSES,
        help="only this status (repeat for several)",
    )
    listing.add_argument("--since", metavar="WHEN", help=_SINCE_HELP)
    listing.add_argument(
        "--limit", type=_positive_int, default=50, metavar="N", help="at most N rows (default 50)"
    )
    listing.add_argument(
        "--kind",
        action="append",
        choices=KINDS,
        help="only this kind of span (repeat for several; default: agent and workflow)",
    )
    listing.set_defaults(handler=_monitor_list)

    stats = sub.add_parser(
        "stats",
        parents=[common],
        help="counts, failure rate, latency percentiles, tokens and cost",
        description="Agent calls by status, failure rate, latency p50/p95/p99, token and cost "
        "totals, and the top agents and models.",
    )
    stats.add_argument("--since", metavar="WHEN", help=_SINCE_HELP)
    stats.add_argument("--agent", metavar="NAME", help="only this agent's calls")
    stats.set_defaults(handler=_monitor_stats)

    trace = sub.add_parser(
        "trace",
        parents=[common],
        help="the tree of one execution",
        description="One execution as a tree: every agent call, LLM attempt and tool call under "
        "it with timings, tokens, cost, status and errors, and the events (retry waits, circuit "
        "breaker changes, fallbacks) where they happened.",
    )
    trace.add_argument("id", metavar="ID", help="an execution id (or a unique prefix of one)")
    trace.set_defaults(handler=_monitor_trace)

    cost = sub.add_parser(
        "cost",
        parents=[common],
        help="calls, tokens and cost per agent, model or day, with a bar chart",
        description="Calls, tokens and cost grouped by agent, model or day (UTC), and a bar "
        "chart of the cost per group (of tokens when no group has a known, non-zero cost). "
        "A group's cost is 'unknown' when one of its calls had no known price: it is at least "
        "what its other calls cost, never taken as 0.",
    )
    cost.add_argument("--by", choices=GROUPS, default="agent", help="how to group (default: agent)")
    cost.add_argument("--since", metavar="WHEN", help=_SINCE_HELP)
    cost.set_defaults(handler=_monitor_cost)

    live = sub.add_parser(
        "live",
        parents=[common],
        help="a refreshing view of recent executions",
        description="A view of the latest executions, a running summary and a sparkline of "
        "recent agent-call latencies, refreshed until Ctrl-C.",
    )
    live.add_argument(
        "--interval",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 2, at most 86400: a day)",
    )
    live.add_argument(
        "--limit", type=_positive_int, default=15, metavar="N", help="rows shown (default 15)"
    )
    live.add_argument(
        "--iterations",
        type=_positive_int,
        metavar="N",
        help="stop after N refreshes (default: run until Ctrl-C)",
    )
    live.add_argument(
        "--since",
        metavar="WHEN",
        default="1h",
        help="the window of the summary line (default 1h); " + _SINCE_HELP.split(": ", 1)[1],
    )
    live.set_defaults(handler=_monitor_live)


def _add_runs(commands: Any) -> None:
    runs = commands.add_parser(
        "runs",
        help="durable workflow runs: list, show, resume, recover, prune",
        description="The durable workflow runs journaled in the event store "
        "(@workflow(durable=True), Workflow.run(..., run_id=...)): their status, their "
        "journaled steps, resuming one whose process died or that failed, and deleting "
        "those that ended long ago.",
    )
    runs.set_defaults(handler=None, group_parser=runs)
    sub = runs.add_subparsers(title="commands", metavar="COMMAND")
    common = _store_options()
    formatter = argparse.RawDescriptionHelpFormatter

    listing = sub.add_parser(
        "list",
        parents=[common],
        help="a table of durable runs",
        description="Durable runs, most recently updated first: status, steps journaled, "
        "attempts, times, the process that runs (or ran) them and their error. A run is "
        "'interrupted' when it is still marked running but its process is gone (known at once "
        "on the host that ran it), stopped renewing its lease (KAGURA_LEASE_SECONDS, default "
        "30) or was cancelled (its lease given up): it can be resumed.",
        epilog="examples:\n  kagura runs list --status interrupted\n"
        "  kagura runs list --workflow write_report --limit 10",
        formatter_class=formatter,
    )
    listing.add_argument("--status", choices=RUN_STATUSES, help="only runs in this status")
    listing.add_argument("--workflow", metavar="NAME", help="only runs of this workflow")
    listing.add_argument(
        "--limit", type=_positive_int, default=50, metavar="N", help="at most N rows (default 50)"
    )
    listing.set_defaults(handler=_runs_list)

    show = sub.add_parser(
        "show",
        parents=[common],
        help="one run and its journaled steps",
        description="One durable run: its workflow, arguments, status, attempts and owner, "
        "then every journaled step (agent call, tool call, kagura.step) with its key, kind, "
        "name, input hash and recorded output.",
    )
    show.add_argument("id", metavar="ID", help="a run id (or a unique prefix of one)")
    show.set_defaults(handler=_runs_show)

    resume = sub.add_parser(
        "resume",
        parents=[common],
        help="finish an interrupted or failed run in this process",
        description="Import the run's workflow from the target it recorded (module:name or "
        "file.py:name; the current directory is searched first) and finish the run here: "
        "journaled steps return their recorded results without calling a model again, the "
        "rest run. Prints the result. A run still held by a live process is refused, and so "
        "is a file whose top-level code would start the script again (an asyncio.run(...) "
        'outside `if __name__ == "__main__":`), before any of it runs.',
    )
    resume.add_argument("id", metavar="ID", help="a run id (or a unique prefix of one)")
    resume.set_defaults(handler=_runs_resume)

    recover = sub.add_parser(
        "recover",
        parents=[common],
        help="resume every interrupted run (this host's by default)",
        description="Resume, in this process, every durable run that is interrupted: those "
        "this host was executing when their process died (known at once), or with --all-hosts "
        "also other hosts' runs whose lease has run out. Each run is resumed once even when "
        "several processes recover at the same moment: the others report it as taken. Run it "
        "when a service starts. Exits with 1 if a run failed again or its workflow could not "
        "be imported.",
    )
    recover.add_argument(
        "--all-hosts", action="store_true", help="also recover runs of other hosts"
    )
    recover.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        metavar="N",
        help="runs resumed at once (default 8)",
    )
    recover.set_defaults(handler=_runs_recover)

    prune = sub.add_parser(
        "prune",
        parents=[common],
        help="delete the runs that ended before a time (retention)",
        description="Delete the durable runs that ended (completed or failed) before --older-than, "
        "with their journaled steps: their arguments, results, errors and step outputs. Runs "
        "that are running or interrupted are kept, however old. A deleted run's id is free "
        "again: starting it runs the workflow afresh. What agents and workflows recorded "
        "(kagura monitor) is not touched: EventStore.delete_older_than deletes that.",
        epilog="examples:\n  kagura runs prune --older-than 30d\n"
        "  kagura runs prune --older-than 2025-06-01",
        formatter_class=formatter,
    )
    prune.add_argument(
        "--older-than",
        required=True,
        metavar="WHEN",
        help="runs that ended before then: a duration back from now (90s, 30m, 1h, 2d, 1w; 0s: "
        "every run that has ended so far) or an ISO date/time (2025-06-01, 2025-06-01T09:00; "
        "local time unless it names a zone), not later than now",
    )
    prune.set_defaults(handler=_runs_prune)


def build_parser() -> argparse.ArgumentParser:
    """The ``kagura`` command's argument parser."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kagura",
        description="Kagura: reliable LLM agent workflows on plain asyncio.",
        epilog="Run 'kagura monitor --help' for the commands that read the event store, "
        "'kagura runs --help' for durable workflow runs, and 'kagura keygen' for a key that "
        "encrypts what the store keeps of your data (KAGURA_ENCRYPTION_KEY).",
    )
    parser.add_argument("--version", action="version", version=f"kagura {__version__}")
    parser.set_defaults(handler=None, group_parser=parser)
    commands = parser.add_subparsers(title="command groups", metavar="GROUP")
    _add_monitor(commands)
    _add_runs(commands)
    _add_keygen(commands)
    return parser


def _store_url(args: argparse.Namespace) -> str:
    from ._storage import default_url, normalise_url

    db: str | None = getattr(args, "db", None)
    return normalise_url(db) if db else default_url()


def _run(handler: Handler, args: argparse.Namespace) -> int:
    from .errors import StoreError, UsageError

    try:
        return handler(args)
    except (CliError, StoreError, UsageError) as error:
        # StoreError names the store and the cause; UsageError includes encrypted values with
        # no key that decrypts them (EncryptionKeyError), or a key set and no cryptography.
        _say_error(_scrub(str(error), _store_url(args)))
        return 1
    except Exception as error:
        if not _is_store_error(error):
            raise
        from ._storage import store_error

        # A database error that reached here untranslated: said as a StoreError says it.
        _say_error(str(store_error(_store_url(args), "read", error)))
        return 1


def _say_error(message: str) -> None:
    """``kagura: error: message`` on stderr. A message may quote what was recorded (an id, a
    resumed run's error), so its control characters are shown, not obeyed (newlines kept:
    a database's error takes several lines)."""
    from ._table import visible

    print("kagura: error: " + visible(message, keep="\n"), file=sys.stderr)


def _is_store_error(error: Exception) -> bool:
    """Store errors, database errors (and a missing database driver) are reported, not
    raised."""
    from .errors import StoreError

    if isinstance(error, (ImportError, StoreError)):
        return True
    try:
        from sqlalchemy import exc
    except ImportError:
        return False
    return isinstance(error, (exc.SQLAlchemyError, exc.ArgumentError))


def main(argv: list[str] | None = None) -> int:
    """Run ``kagura`` with ``argv`` (default: the process arguments); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    handler: Handler | None = args.handler
    if handler is None:
        args.group_parser.print_help(sys.stderr)
        return 2
    try:
        return _run(handler, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``kagura monitor list | head``): stop quietly, and keep Python
        # from complaining again when it flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
