"""What a SIGKILL takes from the recordings: the window of finished spans it can lose.

A child process makes a burst of agent calls on the zero-latency fake model ("fake"), recording
to a fresh SQLite store. Once a given number of its calls have finished (and the workflow has
seen their results), it stops itself (SIGSTOP: every thread halts at that instant, the
recorder's too) and this process kills it (SIGKILL). Then the store is read: calls whose end is
recorded, calls recorded as interrupted (they were on record as running: see the recorder's
``_RUNNING_AFTER_NS``), and calls that left no row at all.

The recorder hands its rows to the writer process every 1,000 rows and otherwise every 0.25 s
(``flush_interval``): a SIGKILL loses what finished since the last hand-over, at most 0.25 s
of recording. Killing at different points of the burst shows the spread.

Run: .venv/bin/python benchmarks/bench_sigkill.py [--calls N] [--trials K] [--json F]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import ROOT, Report

CHILD = """
import asyncio, os, signal, sys
from kagura import agent
from kagura.observability._recorder import default_recorder

calls, stop_after = int(sys.argv[1]), int(sys.argv[2])
finished = 0


@agent(model="fake")
async def echo(n: int) -> str:
    '''Echo {{ n }}'''


async def one(n: int) -> None:
    global finished
    await echo(n)
    finished += 1
    if finished == stop_after:
        os.kill(os.getpid(), signal.SIGSTOP)


async def main() -> None:
    await echo(-1)
    # The recorder's writer process is up and that first call is on disk: what a kill loses
    # while the writer process starts (the first second of a process) is not measured here.
    await asyncio.to_thread(default_recorder().flush)
    await asyncio.gather(*(one(n) for n in range(calls)))


asyncio.run(main())
"""


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started, from any of its threads (the recorder's thread starts
    the writer process)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def trial(calls: int, stop_after: int) -> tuple[int, int, int]:
    """(recorded as finished, recorded as interrupted, no row) among the ``stop_after`` calls
    that had finished when the child was killed."""
    from kagura._storage import forget, normalise_url
    from kagura.observability import EventStore

    with tempfile.TemporaryDirectory() as home:
        db = str(Path(home) / "events.db")
        env = {**os.environ, "KAGURA_DB": db, "PYTHONPATH": str(ROOT / "src")}
        command = [sys.executable, "-c", CHILD, str(calls), str(stop_after)]
        child = subprocess.Popen(command, env=env)
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise RuntimeError("the child ended before it stopped")
        writers = children_of(child.pid)  # the recorder's writer process
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        for pid in writers:  # it writes what it had read from the pipe, then exits
            wait_gone(pid)
        store = EventStore(db)  # closes the dead process's running spans as interrupted
        spans = store.get_executions(kind="agent", limit=None)
        finished = [s for s in spans if s["status"] == "completed" and s["inputs"] != {"n": -1}]
        interrupted = [s for s in spans if s["status"] == "interrupted"]
        forget(normalise_url(db))
    recorded = len(finished)
    return recorded, len(interrupted), stop_after - min(recorded, stop_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls in the burst (default 5000)")
    parser.add_argument("--trials", type=int, default=5, help="kills (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    report = Report(
        "sigkill",
        "What a SIGKILL loses of the recordings",
        "benchmarks/bench_sigkill.py",
        "A burst of agent calls on the zero-latency fake model; the process is killed (SIGKILL) "
        "once a given number of them have finished. Finished calls whose end is not in the "
        "store are what the kill lost; calls that were on record as running are closed as "
        "interrupted when the store is next read.",
        {"calls": args.calls, "trials": args.trials},
    )
    table = report.table(
        f"Finished calls when killed, and what the store has of them ({args.calls} calls)",
        ["killed after", "recorded finished", "lost", "lost, % of the burst", "interrupted rows"],
    )
    lost_all = []
    for k in range(args.trials):
        stop_after = args.calls * (k + 1) // (args.trials + 1)
        recorded, interrupted, lost = trial(args.calls, stop_after)
        lost_all.append(lost)
        table.add(
            f"{stop_after:,}",
            f"{recorded:,}",
            f"{lost:,}",
            f"{lost / args.calls * 100:.1f}%",
            f"{interrupted:,}",
        )
    report.line(
        f"Lost finished calls: {min(lost_all)} to {max(lost_all)} (median "
        f"{statistics.median(lost_all):.0f}) of {args.calls:,}; the bound is what finishes in the "
        "recorder's flush interval (0.25 s) or 1,000 rows, whichever comes first."
    )
    report.finish(started, args.json)


if __name__ == "__main__":
    main()
