"""The event store's read queries over large stores, on SQLite and on PostgreSQL, and how their
time grows with the store (not a test: it prints figures). Issue 17, part 3: under 0.3 s for
``stats``, ``cost`` by agent, model and day, and ``list``, on both, at 1M and 10M executions.

For each backend and each ``--executions`` size (default 1,000,000 and 10,000,000 recorded agent
calls, what ``kagura monitor stats`` counts as executions), a store is built with the rows of
``bench_store.store_rows`` (workflow runs of four agent calls, their LLM attempts, over 30 days):

- SQLite: ``bench_store.build_store`` (Kagura makes the schema; the spans table's indexes are
  dropped during the load and made again after);
- PostgreSQL: a throwaway server (``_postgres.py``) tuned for loading; Kagura makes the schema in
  a new database, the spans table's secondary indexes are dropped, the rows go in with ``COPY``,
  the indexes are made again, then ``VACUUM ANALYZE``.

Then the rollup tables are filled from the spans (``kagura._storage.rebuild_rollups``), and
timed. Then ``EventStore`` queries are timed in-process (median of
``--reps`` after one warm-up call), and the whole ``kagura monitor`` commands as subprocesses.
Each store is deleted once measured (unless ``--keep DIR``), so at most one store per backend is
on disk at a time.

    .venv/bin/python benchmarks/bench_queries.py [--executions 1000000 10000000]
        [--backends sqlite postgresql] [--reps 5] [--keep DIR] [--build-only] [--json PATH]
"""

from __future__ import annotations

import os
import tempfile

# Settings are read when kagura first needs them: set them before anything imports it. No
# setting of the user's may reach the stores measured here (every one is named by its URL);
# KAGURA_HOME is a fresh directory, so nothing falls back to ~/.kagura.
_HOME = tempfile.mkdtemp(prefix="kagura-bench-queries-")
for _name in [name for name in os.environ if name.startswith("KAGURA_")]:
    del os.environ[_name]
os.environ["KAGURA_HOME"] = _HOME

import argparse  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from _bench import Report, console, fmt, median, ratio  # noqa: E402
from _postgres import PostgresServer, PostgresUnavailable, postgres_server  # noqa: E402
from bench_store import (  # noqa: E402
    DAY,
    StoreCounts,
    build_rollups,
    build_store,
    store_rows,
    time_cli,
)
from rich.console import Console  # noqa: E402

from kagura._storage import dispose_all, engine_for, forget, normalise_url  # noqa: E402
from kagura.observability import EventStore  # noqa: E402
from kagura.observability._writer import SPAN_COLUMNS as COLUMNS  # noqa: E402

TARGET = 0.3  # seconds: issue 17's goal for each query
CLI_REPS = 3
AGENT = "classify"  # one of the 24 agent names: about 1/24 of the calls
BACKENDS = ("sqlite", "postgresql")
BACKEND_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
#: Loading settings of the throwaway PostgreSQL server. Durability is off (a crash loses a
#: benchmark store, nothing else); maintenance_work_mem speeds the index builds; shared_buffers
#: of 1 GB (the default is 128 MB) is nearer what a server with this much memory would be given.
PG_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "maintenance_work_mem=512MB",
    "shared_buffers=1GB",
)
#: Disk a store takes per execution, with room to spare (measured: SQLite about 1.05 KB,
#: PostgreSQL about 1.2 KB, indexes and rollups included): a size that would not fit is
#: skipped, not started.
DISK_PER_EXECUTION = 1_600

Query = Callable[[EventStore, float], object]  # (a store, the time now) -> the query's result


def a_day_ago(now: float) -> float:
    """A day before ``now``, moved to just before the half hour: a query from a moment within an
    hour reads that hour's spans on the moment's shorter side, so there it reads the most (half
    an hour's). The figure would otherwise depend on the minute the benchmark ran."""
    hour = (now - DAY) // 3600 * 3600
    return hour + 1800 - 1


#: What is timed in-process: (label, the call). ``list`` is ``kagura monitor list``'s query.
QUERIES: tuple[tuple[str, Query], ...] = (
    ("stats()", lambda store, now: store.stats()),
    (f'stats(agent_name="{AGENT}")', lambda store, now: store.stats(agent_name=AGENT)),
    ("stats(since=a day ago)", lambda store, now: store.stats(since=a_day_ago(now))),
    (
        f'stats(agent_name="{AGENT}", since=a day ago)',
        lambda store, now: store.stats(agent_name=AGENT, since=a_day_ago(now)),
    ),
    ('cost(by="agent")', lambda store, now: store.cost(by="agent")),
    ('cost(by="model")', lambda store, now: store.cost(by="model")),
    ('cost(by="day")', lambda store, now: store.cost(by="day")),
    ("get_executions(limit=50): list", lambda store, now: store.get_executions(limit=50)),
    (
        f'get_executions("{AGENT}", limit=50)',
        lambda store, now: store.get_executions(AGENT, limit=50),
    ),
    (
        'get_executions(status="failed", limit=50)',
        lambda store, now: store.get_executions(status="failed", limit=50),
    ),
)
#: The whole commands, as subprocesses: (label, arguments before ``--db URL``).
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kagura monitor stats --db URL", ("monitor", "stats")),
    ("kagura monitor cost --db URL --by model", ("monitor", "cost", "--by", "model")),
    ("kagura monitor list --db URL", ("monitor", "list")),
)
STARTUP = "kagura --help (the CLI's start-up)"


def size_label(executions: int) -> str:
    """1M, 10M, 200k: the sizes as the issue names them."""
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if executions >= scale:
            return f"{executions / scale:g}{unit}"
    return str(executions)


def gib(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB"


# -- the stores ----------------------------------------------------------------------------------


@dataclass
class Built:
    """How a store was made: its rows and the seconds of each phase."""

    counts: StoreCounts
    phases: dict[str, float] = field(default_factory=dict)
    rollups: float = 0.0  # seconds to build them from the spans

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


class SqliteStores:
    """SQLite files in ``directory``: ``events-N.db`` for N executions. A store is built under
    another name and renamed once complete, so a kept one is never half-built."""

    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, executions: int, suffix: str = "") -> Path:
        return self.directory / f"events-{executions}.db{suffix}"

    def url(self, executions: int) -> str:
        """The store as a user names it (``--db``, ``EventStore(...)``): its path."""
        return str(self._path(executions))

    def exists(self, executions: int) -> bool:
        return self._path(executions).exists()

    def build(self, executions: int, seed: int) -> Built:
        building = self._path(executions, ".building")
        self._remove(building)
        built = Built(StoreCounts())
        built.counts = build_store(building, executions, seed, built.phases)
        built.rollups = built.phases.pop("rollups")  # reported apart from the build
        forget(normalise_url(building))
        for sidecar in ("", "-wal", "-shm"):
            part = Path(f"{building}{sidecar}")
            if part.exists():
                part.rename(f"{self._path(executions)}{sidecar}")
        return built

    def size(self, executions: int) -> int:
        path = self._path(executions)
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())

    def remove(self, executions: int) -> None:
        forget(normalise_url(self.url(executions)))
        self._remove(self._path(executions))

    @staticmethod
    def _remove(path: Path) -> None:
        for sidecar in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{sidecar}").unlink(missing_ok=True)


class PostgresStores:
    """Databases ``kagura_N`` of one server. A store is built as ``kagura_N_building`` and
    renamed once complete, so a kept one is never half-built."""

    name = "postgresql"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def url(self, executions: int) -> str:
        """The store as a user names it: ``postgresql://...``."""
        return self.server.url(f"kagura_{executions}")

    def exists(self, executions: int) -> bool:
        return f"kagura_{executions}" in self.server.databases()

    def build(self, executions: int, seed: int) -> Built:
        building = f"kagura_{executions}_building"
        self.server.admin(f"DROP DATABASE IF EXISTS {building} WITH (FORCE)")
        self.server.admin(f"CREATE DATABASE {building}")
        url = normalise_url(self.server.url(building))
        engine_for(url)  # Kagura creates its schema (tables and indexes)
        dispose_all()
        built = Built(StoreCounts())
        with self.server.connect(building, autocommit=False) as connection:
            # Secondary indexes only: the primary key stays (rows arrive in its order anyway).
            indexes = connection.execute(
                "SELECT indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = current_schema() AND tablename = 'kagura_spans' "
                "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
            ).fetchall()
            for name, _ in indexes:
                connection.execute(f'DROP INDEX "{name}"')
            start = time.perf_counter()
            copy_sql = f"COPY kagura_spans ({', '.join(COLUMNS)}) FROM STDIN"
            with connection.cursor().copy(copy_sql) as copy:
                for row in store_rows(executions, seed, built.counts):
                    copy.write_row(row)
            connection.commit()
            loaded = time.perf_counter()
            for _, sql in indexes:
                connection.execute(sql)
            connection.commit()
            built.phases = {"rows": loaded - start, "indexes": time.perf_counter() - loaded}
        start = time.perf_counter()
        with self.server.connect(building) as connection:
            # The statistics the planner needs (and the visibility map index-only scans need):
            # what autovacuum would have done by the time a table grew this big, so the rollups
            # are built as an upgrade would build them, from a table the planner knows.
            connection.execute("VACUUM ANALYZE")
        built.phases["vacuum analyze"] = time.perf_counter() - start
        built.rollups = build_rollups(url)
        forget(url)
        start = time.perf_counter()
        with self.server.connect(building) as connection:
            connection.execute("ANALYZE")  # the rollup tables, just filled
        built.phases["analyze"] = time.perf_counter() - start
        self.server.admin(f"ALTER DATABASE {building} RENAME TO kagura_{executions}")
        return built

    def size(self, executions: int) -> int:
        rows = self.server.admin("SELECT pg_database_size(%s)", f"kagura_{executions}")
        return int(rows[0][0])

    def remove(self, executions: int) -> None:
        forget(normalise_url(self.url(executions)))
        self.server.admin(f"DROP DATABASE IF EXISTS kagura_{executions} WITH (FORCE)")


Stores = SqliteStores | PostgresStores


# -- timing --------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One store's figures (seconds)."""

    backend: str
    executions: int
    built: Built | None  # None: a kept store, reused
    disk: int
    counted: int = 0  # what stats() counted as executions
    queries: dict[str, list[float]] = field(default_factory=dict)
    commands: dict[str, list[float]] = field(default_factory=dict)


def time_queries(url: str, reps: int, say: Console) -> tuple[dict[str, list[float]], int]:
    """Every query's times (and the executions ``stats()`` counted). Each call is on a fresh
    ``EventStore(url)``, as each CLI command makes one; they share the process's engine (and its
    pooled connections), which the untimed warm-up call opened."""
    times: dict[str, list[float]] = {}
    counted = 0
    for label, query in QUERIES:
        result = query(EventStore(url), time.time())
        if label == "stats()":
            assert isinstance(result, dict)
            counted = int(result["executions"])
        elif label.startswith("get_executions") and not (
            isinstance(result, list) and len(result) == 50
        ):
            raise RuntimeError(f"{label} did not return 50 executions")
        taken: list[float] = []
        for _ in range(reps):
            store = EventStore(url)
            now = time.time()
            start = time.perf_counter()
            query(store, now)
            taken.append(time.perf_counter() - start)
        times[label] = taken
        say.print(f"    {label}: {median(taken):.3f} s", style="dim")
    return times, counted


def time_commands(url: str, env: dict[str, str], say: Console) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for label, args in COMMANDS:
        times[label], output = time_cli([*args, "--db", url], CLI_REPS, env)
        if not output.strip():
            raise RuntimeError(f"{label} printed nothing")
        say.print(f"    {label}: {median(times[label]):.3f} s", style="dim")
    times[STARTUP], _ = time_cli(["--help"], CLI_REPS, env)
    return times


def measure(
    stores: Stores,
    executions: int,
    args: argparse.Namespace,
    env: dict[str, str],
    say: Console,
) -> Measured:
    """Build (or reuse) the store, then time what it answers."""
    where = BACKEND_NAMES[stores.name]
    built = None
    if args.keep and stores.exists(executions):
        say.print(f"{where}, {size_label(executions)}: reusing the kept store", style="dim")
    else:
        say.print(f"{where}, {size_label(executions)}: building ...", style="dim")
        built = stores.build(executions, args.seed)
        phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in built.phases.items())
        say.print(f"  built in {built.seconds:.0f} s ({phases})", style="dim")
        say.print(f"  rollups built from the spans in {built.rollups:.1f} s", style="dim")
    measured = Measured(stores.name, executions, built, stores.size(executions))
    say.print(f"  on disk: {gib(measured.disk)}", style="dim")
    if not args.build_only:
        url = stores.url(executions)
        say.print(f"  in-process (median of {args.reps}):", style="dim")
        measured.queries, measured.counted = time_queries(url, args.reps, say)
        say.print(f"  whole commands (median of {CLI_REPS}):", style="dim")
        measured.commands = time_commands(url, env, say)
        dispose_all()
    return measured


def fits(directory: Path, executions: int, say: Console, report: Report, where: str) -> bool:
    """Whether a store of ``executions`` fits on the disk of ``directory`` (else a note)."""
    need, free = executions * DISK_PER_EXECUTION, shutil.disk_usage(directory).free
    if need <= free:
        return True
    text = (
        f"NOTE: {where}, {size_label(executions)} skipped: a store needs about {gib(need)}, "
        f"{gib(free)} free"
    )
    say.print(text, style="yellow")
    report.line(text)
    return False


@contextmanager
def backend_stores(backend: str, directory: Path, server_dir: Path, keep: bool) -> Iterator[Stores]:
    """The stores of ``backend``: SQLite files in ``directory``, or databases of a PostgreSQL
    server whose cluster is in ``server_dir`` (removed at the end unless kept)."""
    if backend == "sqlite":
        yield SqliteStores(directory)
        return
    try:
        with postgres_server(server_dir, PG_SETTINGS) as server:
            yield PostgresStores(server)
    finally:
        dispose_all()  # its pooled connections, before the server goes
        if not keep:
            shutil.rmtree(server_dir, ignore_errors=True)


# -- the report ----------------------------------------------------------------------------------


def fill_report(report: Report, results: list[Measured], sizes: list[int], reps: int) -> None:
    stores = report.table(
        "The stores", ["store", "rows", "on disk", "built in", "rollups built from the spans in"]
    )
    for m in results:
        built = m.built
        if built is None:
            stores.add(
                f"{BACKEND_NAMES[m.backend]}, {size_label(m.executions)} executions",
                "(kept)",
                gib(m.disk),
                "(kept)",
                "(kept)",
            )
            continue
        phases = ", ".join(f"{name} {seconds:.0f}" for name, seconds in built.phases.items())
        stores.add(
            f"{BACKEND_NAMES[m.backend]}, {size_label(m.executions)} executions",
            f"{built.counts.rows:,}",
            gib(m.disk),
            f"{built.seconds:,.0f} s ({phases})",
            f"{built.rollups:,.1f} s",
        )
    stores.notes.append(
        "Rows: one per agent call, LLM attempt (4% of calls retried once) and workflow run (four "
        "calls each), over 30 days (`bench_store.store_rows`). Built: the rows inserted with the "
        "spans table's secondary indexes dropped, then the indexes made again (SQLite: "
        "`executemany`; PostgreSQL: `COPY`, then `VACUUM ANALYZE`, and `ANALYZE` once the rollups "
        "are built). The rollups' time is also "
        "what a store made by a version without them pays once, when it is upgraded."
    )
    stores.notes.append(
        "The PostgreSQL server is a throwaway one tuned for loading: "
        + ", ".join(f"`{s}`" for s in PG_SETTINGS)
        + "; every other setting is the default (JIT included)."
    )

    timed = [m for m in results if m.queries]
    if not timed:
        return
    first, last = sizes[0], sizes[-1]
    growth = f"{size_label(last)} / {size_label(first)}" if last != first else None
    for backend in BACKENDS:
        by_size = {m.executions: m for m in timed if m.backend == backend}
        if not by_size:
            continue
        shown = [s for s in sizes if s in by_size]
        where = BACKEND_NAMES[backend]
        columns = ["query", *(f"{size_label(s)} (s)" for s in shown)]
        if growth and first in by_size and last in by_size:
            columns.append(growth)
        columns.append(f"≤ {TARGET} s")
        table = report.table(f"{where}: queries in-process (median of {reps})", columns)
        for label, _ in QUERIES:
            figures = [median(by_size[s].queries[label]) for s in shown]
            cells = [fmt(f, 3) for f in figures]
            if len(columns) == len(shown) + 3:
                cells.append(ratio(figures[-1], figures[0]))
            cells.append(" / ".join("PASS" if f <= TARGET else "MISS" for f in figures))
            table.add(label, *cells)
        table.notes.append(
            f"Each timed call on a fresh `EventStore(url)` (they share the process's engine and "
            f"pooled connections), after one untimed call; the stores were just built, so their "
            f"pages are in the page cache: warm-cache figures. `{AGENT}` is one agent of 24 "
            f"(about 1/24 of the calls); `a day ago` is a day before now, moved to a second "
            f"before the half hour (where the most spans are read): about 1/30 of them."
        )
        commands = report.table(
            f"{where}: the whole commands (median of {CLI_REPS})",
            ["command", *(c for c in columns[1:] if c != f"≤ {TARGET} s")],
        )
        for label in [*(c for c, _ in COMMANDS), STARTUP]:
            figures = [median(by_size[s].commands[label]) for s in shown]
            cells = [fmt(f, 3) for f in figures]
            if len(commands.columns) == len(shown) + 2:
                cells.append(ratio(figures[-1], figures[0]))
            commands.add(label, *cells)
        commands.notes.append(
            "Subprocesses: interpreter start, imports, the query, rendering. The start-up row "
            "is what every command pays before its query."
        )
        for s in shown:
            m = by_size[s]
            medians = {label: median(times) for label, times in m.queries.items()}
            slowest = max(medians, key=lambda label: medians[label])
            report.check(
                f"stats, cost and list under {TARGET} s, {where}, {size_label(s)} executions",
                medians[slowest] <= TARGET,
                f"slowest {slowest} {medians[slowest]:.3f} s, fastest "
                f"{min(medians.values()):.3f} s",
            )
            if m.counted != s:
                report.line(f"NOTE: stats() counted {m.counted:,} executions in the {where} store")
        if growth and first in by_size and last in by_size:
            ratios = {
                label: median(by_size[last].queries[label]) / median(by_size[first].queries[label])
                for label, _ in QUERIES
            }
            low = min(ratios, key=lambda label: ratios[label])
            high = max(ratios, key=lambda label: ratios[label])
            report.line(
                f"How it grows, {where}: {last / first:g}× the executions, each query "
                f"{ratios[low]:.2f}× ({low}) to {ratios[high]:.2f}× ({high}) the time."
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--executions",
        type=int,
        nargs="+",
        default=[1_000_000, 10_000_000],
        help="store sizes, in agent calls (default: 1000000 10000000)",
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), metavar="BACKEND"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed calls per query")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the stores in DIR (SQLite files, a PostgreSQL cluster), reused next time",
    )
    parser.add_argument("--build-only", action="store_true", help="build the stores; time no query")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()
    sizes = sorted(set(args.executions))
    say = console()
    report = Report(
        name="queries",
        title="The event store's queries over large stores",
        command="python benchmarks/bench_queries.py",
        description=(
            "The time of `EventStore.stats`, `cost` (by agent, model and day) and "
            "`get_executions` (what `kagura monitor list` runs), and of the whole `kagura "
            "monitor` commands, over stores of "
            + " and ".join(f"{s:,}" for s in sizes)
            + " recorded agent calls, on "
            + " and ".join(BACKEND_NAMES[b] for b in args.backends)
            + f"; target (issue 17): each query under {TARGET} s."
        ),
        params={
            "executions": " ".join(str(s) for s in sizes),
            "backends": " ".join(args.backends),
            "reps": args.reps,
            "seed": args.seed,
        },
    )
    started = time.perf_counter()
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kagura-queries-"))
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and "postgresql" in args.backends:
        # The PostgreSQL server runs as `postgres` and must reach its cluster inside it.
        directory.chmod(directory.stat().st_mode | 0o011)
    env = {**os.environ, "COLUMNS": "120"}  # no KAGURA_* but the fresh KAGURA_HOME (see top)
    results: list[Measured] = []
    try:
        for backend in args.backends:
            where = BACKEND_NAMES[backend]
            with ExitStack() as stack:
                try:
                    stores = stack.enter_context(
                        backend_stores(
                            backend, directory, directory / "postgresql", bool(args.keep)
                        )
                    )
                except PostgresUnavailable as error:
                    report.line(f"NOTE: {where} skipped: {error}")
                    say.print(f"{where} skipped: {error}", style="yellow")
                    continue
                for executions in sizes:
                    if not (args.keep and stores.exists(executions)) and not fits(
                        directory, executions, say, report, where
                    ):
                        continue
                    try:
                        results.append(measure(stores, executions, args, env, say))
                    finally:
                        if not args.keep:
                            stores.remove(executions)
        fill_report(report, results, sizes, args.reps)
    finally:
        dispose_all()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(_HOME, ignore_errors=True)
    report.finish(started, args.json)


if __name__ == "__main__":
    main()
