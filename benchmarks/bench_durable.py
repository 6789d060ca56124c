"""What durable runs cost.

1. Overhead per agent step: the same workflow (three agents in parallel, then one over their
   results) on the zero-latency fake model "fake", durable=False and durable=True, alternated in
   one run (the order flips every round); median of the rounds. Every step of a durable run is
   committed before the workflow sees its result.
2. The same on a provider answering in 100 ms (the fake model with a delay), one run at a time
   and 200 at once: what durability adds to a run's wall time, as a share of it. Beside it, the
   floor of a run on this machine: a bare ``sqlite3`` commit, synced as the journal's commits of
   steps are, made by a thread and awaited on the event loop after the same 100 ms wait, twice
   (a run waits for two commits of steps, one per level of its calls).
3. Resuming a run whose steps are all journaled: runs that failed just after their last step are
   resumed, every agent call answered from the journal; and ``recover()`` of runs left as a
   killed process leaves them (running, held by a process that is gone). Per replayed step,
   against a fresh run of the same workflow, with ``kagura.testing.replay`` (the same run
   against its journal, read-only) beside them.
4. Finding interrupted runs in a journal that also holds many finished ones (``list_runs``, what
   ``recover()`` and ``kagura runs list`` read), against the same listing of a journal holding
   the interrupted runs alone; then deleting the finished ones (``delete_older_than``, retention)
   against inserting them.

Recording is off (``KAGURA_RECORD=0``) unless ``--record``: ``bench_recording.py`` measures it.
The journal goes to a fresh SQLite file in a temporary directory.

Run: .venv/bin/python benchmarks/bench_durable.py [--runs N] [--rounds K] [--record] [--json F]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Settings are read when kagura first needs them: set them before anything runs.
_HOME = tempfile.mkdtemp(prefix="kagura-bench-durable-")
os.environ["KAGURA_HOME"] = _HOME
os.environ["KAGURA_DB"] = str(Path(_HOME) / "journal.db")
os.environ["KAGURA_RECORD"] = "1" if "--record" in sys.argv else "0"
for _name in ("KAGURA_DURABLE", "KAGURA_MODEL_OVERRIDE", "KAGURA_LEASE_SECONDS"):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable  # noqa: E402
from typing import Any  # noqa: E402

from _bench import Report, run_recorded  # noqa: E402

from kagura import Workflow, agent, workflow  # noqa: E402
from kagura.durable import Journal, journal_for, recover  # noqa: E402
from kagura.testing import FakeModel, replay  # noqa: E402

STEPS_PER_RUN = 4


@agent(model="fake")
async def step(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """{{ text }}"""


async def fan_in(text: str) -> str:
    a, b, c = await asyncio.gather(step(text), step(text), step(text))
    return await step(a + b + c)


plain = workflow(durable=False, name="fan_in")(fan_in)
durable = workflow(durable=True, name="fan_in_durable")(fan_in)

SLOW = FakeModel(delay=0.1, record_requests=False)  # a provider answering in 100 ms


@agent(model=SLOW)
async def slow_step(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """{{ text }}"""


async def slow_fan_in(text: str) -> str:
    a, b, c = await asyncio.gather(slow_step(text), slow_step(text), slow_step(text))
    return await slow_step(a[:20] + b[:20] + c[:20])


slow_plain = workflow(durable=False, name="slow_fan_in")(slow_fan_in)
slow_durable = workflow(durable=True, name="slow_fan_in_durable")(slow_fan_in)


class Crash:
    """Whether ``fan_in_crashing`` fails after its last step (the runs to resume)."""

    on = True


@workflow(durable=True)
async def fan_in_crashing(text: str) -> str:
    result = await fan_in(text)
    if Crash.on:
        raise RuntimeError("crashed after the last step")
    return result


async def per_step_us(calls: list[Awaitable[object]]) -> float:
    """µs per agent step of ``calls`` (runs not started yet), all started at once."""
    started = time.perf_counter()
    await asyncio.gather(*calls)
    return (time.perf_counter() - started) / (len(calls) * STEPS_PER_RUN) * 1e6


def batch(flow: Workflow[[str], str], runs: int) -> list[Awaitable[object]]:
    return [flow("x") for _ in range(runs)]


async def overhead(runs: int, rounds: int) -> tuple[float, float]:
    """Median µs per step of durable=False and durable=True, alternated round by round."""
    await per_step_us(batch(plain, 200))  # warm-up: imports, caches, the journal's schema
    await per_step_us(batch(durable, 200))
    off: list[float] = []
    on: list[float] = []
    for number in range(rounds):
        pair = ((off, plain), (on, durable))
        for results, flow in pair if number % 2 == 0 else reversed(pair):
            results.append(await per_step_us(batch(flow, runs)))
    return statistics.median(off), statistics.median(on)


async def slow_overhead(runs: int, rounds: int) -> tuple[float, float]:
    """Median ms of wall time per round of ``runs`` runs at once on the 100 ms provider,
    durable=False and durable=True, alternated round by round."""

    async def round_ms(flow: Workflow[[str], str]) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(flow("x") for _ in range(runs)))
        return (time.perf_counter() - started) * 1e3

    await round_ms(slow_plain)
    await round_ms(slow_durable)
    off: list[float] = []
    on: list[float] = []
    for number in range(rounds):
        pair = ((off, slow_plain), (on, slow_durable))
        for results, flow in pair if number % 2 == 0 else reversed(pair):
            results.append(await round_ms(flow))
    return statistics.median(off), statistics.median(on)


async def synced_commit_ms(rounds: int) -> float:
    """Median ms of one synced commit of a step-sized row, bare ``sqlite3`` in WAL mode at
    ``synchronous=FULL`` (the journal's settings for steps), made by a thread and awaited on the
    event loop, each after a 100 ms wait (as a step's commit follows the provider's answer: an
    idle machine's disk and threads answer slower than busy ones)."""
    path = Path(_HOME) / "floor.db"
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE steps (run_id TEXT, step_key TEXT, output TEXT)")

    def commit(number: int) -> None:
        connection.execute("BEGIN")
        connection.execute("INSERT INTO steps VALUES ('run', ?, ?)", (str(number), "x" * 200))
        connection.execute("COMMIT")

    times: list[float] = []
    for number in range(rounds + 1):  # the first warms up
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        await asyncio.to_thread(commit, number)
        if number:
            times.append((time.perf_counter() - started) * 1e3)
    connection.close()
    return statistics.median(times)


async def crashed_runs(runs: int) -> list[str]:
    """Ids of ``runs`` runs that failed just after journaling all their steps."""
    ids = [f"crashed-{uuid.uuid4().hex}" for _ in range(runs)]
    Crash.on = True
    outcomes = await asyncio.gather(
        *(fan_in_crashing.run("x", run_id=run_id) for run_id in ids), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes[:3]
    return ids


def interrupt(journal: Journal, ids: list[str]) -> None:
    """Leave runs as a killed process leaves them: running, held by a process that is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with journal.engine.begin() as connection:
        for run_id in ids:
            connection.exec_driver_sql(
                "UPDATE kagura_runs SET status = 'running', pid = ?, error = NULL, "
                "error_type = NULL WHERE run_id = ?",
                (gone.pid, run_id),
            )


async def resume_cost(runs: int, rounds: int) -> dict[str, float]:
    """Median µs per step of a fresh run, of resuming fully journaled runs, of recovering them
    (as interrupted) and of replaying them; by name."""
    journal = journal_for()
    found: dict[str, list[float]] = {"fresh": [], "resume": [], "recover": [], "replay": []}
    for number in range(rounds + 1):  # the first round warms up
        Crash.on = False
        fresh_us = await per_step_us([fan_in_crashing.run("x") for _ in range(runs)])
        ids = await crashed_runs(runs)
        steps = await asyncio.to_thread(journal.load_steps, ids[0])
        assert len(steps) == STEPS_PER_RUN, steps
        Crash.on = False
        resume_us = await per_step_us([fan_in_crashing.resume(i) for i in ids])
        replay_us = await per_step_us([replay(i, fan_in_crashing) for i in ids])
        record = await asyncio.to_thread(journal.get_run, ids[-1])
        assert record is not None and record.status == "completed", record
        ids = await crashed_runs(runs)
        await asyncio.to_thread(interrupt, journal, ids)
        Crash.on = False
        started = time.perf_counter()
        recovered = await recover()
        recover_us = (time.perf_counter() - started) / (runs * STEPS_PER_RUN) * 1e6
        assert sorted(r.run_id for r in recovered) == sorted(ids), recovered[:3]
        assert {r.outcome for r in recovered} == {"completed"}, recovered[:3]
        if number:
            for name, us in (
                ("fresh", fresh_us),
                ("resume", resume_us),
                ("recover", recover_us),
                ("replay", replay_us),
            ):
                found[name].append(us)
    return {name: statistics.median(values) for name, values in found.items()}


def journal_at_scale(finished: int, interrupted: int, rounds: int) -> dict[str, float]:
    """Median ms of ``list_runs(status="interrupted")`` and of ``list_runs()`` (the 50 last),
    on a journal of ``interrupted`` runs alone (``alone ...``) and on one holding ``finished``
    completed runs of four steps besides (``with ...``); then the seconds it took to insert those
    runs and steps with bare ``sqlite3`` (``insert s``) and to delete them with
    ``delete_older_than`` (``delete s``)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    figures: dict[str, float] = {}
    for name, completed in (("alone", 0), ("with", finished)):
        path = Path(_HOME) / f"listing-{name}.db"
        journal = journal_for(f"sqlite:///{path}")
        journal.engine  # noqa: B018  # made now: the schema
        connection = sqlite3.connect(path)
        now = time.time()
        rows = [
            (f"r{n}", "fan_in", None, "completed", "{}", "o", 1, journal.host, None, now, now)
            for n in range(completed)
        ] + [
            (f"i{n}", "fan_in", None, "running", "{}", "o", gone.pid, journal.host, None, now, now)
            for n in range(interrupted)
        ]
        started = time.perf_counter()
        connection.executemany(
            "INSERT INTO kagura_runs (run_id, workflow, target, status, arguments, owner, pid, "
            "host, pid_start, heartbeat_at, created_at, updated_at, attempts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
            [(*row, now) for row in rows],
        )
        connection.executemany(
            "INSERT INTO kagura_steps (run_id, step_key, name, kind, input_hash, output, "
            "created_at, position) VALUES (?, ?, 'step', 'agent', 'h', '\"x\"', ?, ?)",
            ((row[0], f"fan_in/step#{k}", now, k) for row in rows for k in range(STEPS_PER_RUN)),
        )
        connection.commit()
        figures["insert s"] = time.perf_counter() - started
        connection.close()
        listings: list[tuple[str, dict[str, Any], int]] = [
            ("interrupted", {"status": "interrupted", "limit": None}, interrupted),
            ("last 50", {}, 50),
        ]
        for listing, options, expected in listings:
            times = []
            for _ in range(rounds + 1):
                started = time.perf_counter()
                listed = journal.list_runs(**options)
                times.append((time.perf_counter() - started) * 1e3)
                assert len(listed) == expected, (options, len(listed))
            figures[f"{name} {listing}"] = statistics.median(times[1:])
    started = time.perf_counter()
    deleted = journal.delete_older_than(0)
    figures["delete s"] = time.perf_counter() - started
    assert deleted == finished, deleted
    assert len(journal.list_runs(status="interrupted", limit=None)) == interrupted
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="runs per round (default 500)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--record", action="store_true", help="record spans too (default off)")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()
    recording = "on" if args.record else "off"
    slow_runs = min(args.runs, 200)
    report = Report(
        "durable",
        "Durable runs: what journaling every step costs",
        "benchmarks/bench_durable.py",
        "Every agent call of a durable run is committed to the journal (SQLite, synced to disk) "
        "before the workflow sees its result; concurrent runs share commits. Workflow: three "
        "agent calls in parallel, then one over their results; durable=False and durable=True "
        "alternated round by round.",
        {"runs": args.runs, "rounds": args.rounds, "recording": recording},
    )

    def run() -> None:
        off, on = asyncio.run(overhead(args.runs, args.rounds))
        table = report.table(
            f"Per agent step, zero-latency fake model ({args.runs} runs x {STEPS_PER_RUN} steps "
            f"at once; median of {args.rounds} rounds)",
            ["", "µs/step", "× durable=False"],
        )
        table.add("durable=False", f"{off:.1f}", "1.00×")
        table.add("durable=True", f"{on:.1f}", f"{on / off:.2f}×")
        table.notes.append(
            f"durable=True adds {on - off:.1f} µs a step ({(on - off) * STEPS_PER_RUN / 1000:.2f} "
            "ms a run): the run's start, each step's commit and its finish."
        )

        report.check(
            "durable=True per step ≤ 5× durable=False (zero-latency fake model)",
            on <= 5 * off,
            f"{on / off:.2f}× ({on:.1f} µs against {off:.1f} µs)",
        )

        table = report.table(
            f"A provider answering in 100 ms (each run {STEPS_PER_RUN} steps, two calls deep; "
            f"median of {args.rounds * 3} rounds for one run, {args.rounds} for {slow_runs})",
            ["runs at once", "durable=False ms", "durable=True ms", "added"],
        )
        commit_ms = asyncio.run(synced_commit_ms(args.rounds * 3))
        one_run_ms = 0.0
        for runs, rounds in ((1, args.rounds * 3), (slow_runs, args.rounds)):
            slow_off, slow_on = asyncio.run(slow_overhead(runs, rounds))
            added = (slow_on - slow_off) / slow_off
            if runs == 1:
                one_run_ms = slow_off
            table.add(
                f"{runs:,}",
                f"{slow_off:.1f}",
                f"{slow_on:.1f}",
                f"+{slow_on - slow_off:.1f} ms ({added * 100:+.1f}%)",
            )
            floor = 2 * commit_ms / slow_off
            report.check(
                f"durable=True adds < 1% to a run on a provider answering in 100 ms "
                f"({runs:,} at once)",
                added < 0.01,
                f"{added * 100:+.1f}% (+{slow_on - slow_off:.1f} ms on {slow_off:.1f} ms; "
                f"the floor, two synced commits: {floor * 100:+.1f}%)",
            )
        table.add(
            "floor: 2 bare synced commits",
            "",
            "",
            f"+{2 * commit_ms:.1f} ms ({200 * commit_ms / one_run_ms:+.1f}% of one run)",
        )
        table.notes.append(
            "A run commits four times on its way: its start, the three parallel steps (one "
            "batch), the last step, its finish. The two commits of steps are synced to disk; "
            "the start and finish are not on their own (the next synced commit takes them "
            "there). The floor is what a run of two levels must wait for on this machine "
            f"however the journal is written: two synced commits, {commit_ms:.2f} ms each (bare "
            "sqlite3, from a thread, each after a 100 ms wait). "
            "Runs at once share commits, and what durability adds is then the event "
            "loop's and the journal's thread's time per step (the first table)."
        )

        costs = asyncio.run(resume_cost(args.runs, args.rounds))
        table = report.table(
            f"Resuming runs whose {STEPS_PER_RUN} steps are all journaled ({args.runs} runs; "
            f"median of {args.rounds} rounds)",
            ["", "µs per step", "ms per run", "× a fresh run"],
        )
        for name, label in (
            ("fresh", f"a fresh run (start, {STEPS_PER_RUN} steps run, finish), all at once"),
            ("resume", "resume (claim, load, replay, finish), all at once"),
            ("recover", "recover(): the runs interrupted, 8 at a time (its default)"),
            ("replay", "kagura.testing.replay (read-only), all at once"),
        ):
            us = costs[name]
            table.add(
                label,
                f"{us:.1f}",
                f"{us * STEPS_PER_RUN / 1000:.2f}",
                f"{us / costs['fresh']:.2f}×",
            )
        table.notes.append(
            "Interrupted: as a SIGKILL leaves a run (status running, its process gone), set on "
            "runs that failed after their last step. A start or a claim is answered by the "
            "journal's writer, which takes over, reads and loads the runs queued together in "
            "one transaction."
        )

        finished = 100_000
        scale = journal_at_scale(finished, args.runs, args.rounds)
        table = report.table(
            f"Listing runs: {args.runs} interrupted, alone or beside {finished:,} finished runs of "
            f"{STEPS_PER_RUN} steps (median of {args.rounds})",
            ["", "alone, ms", f"beside {finished:,} finished, ms", "×"],
        )
        for listing, label in (
            ("interrupted", "list_runs(status='interrupted'): what recover() reads"),
            ("last 50", "list_runs(): the 50 last, as kagura runs list"),
        ):
            alone, beside = scale[f"alone {listing}"], scale[f"with {listing}"]
            table.add(label, f"{alone:.1f}", f"{beside:.1f}", f"{beside / alone:.2f}×")
        table.notes.append(
            "Each listed run's steps are counted for the runs listed only. The interrupted "
            "runs are found by the index of runs by status and time of update, the 50 last by "
            "the index of runs by time of update: neither listing reads the finished runs."
        )
        table = report.table(
            f"Retention: deleting {finished:,} finished runs and their "
            f"{finished * STEPS_PER_RUN:,} steps",
            ["", "s", "runs/s", "× inserting them"],
        )
        table.add(
            "inserting them (bare sqlite3 executemany, one transaction)",
            f"{scale['insert s']:.2f}",
            f"{finished / scale['insert s']:,.0f}",
            "1.00×",
        )
        table.add(
            "journal.delete_older_than(0) (the interrupted runs kept)",
            f"{scale['delete s']:.2f}",
            f"{finished / scale['delete s']:,.0f}",
            f"{scale['delete s'] / scale['insert s']:.2f}×",
        )
        table.notes.append(
            "Retention deletes 1,000 runs and their steps in a transaction, found by the index "
            "of runs by status and time of update: a process journaling meanwhile waits for one "
            "batch at most. The insert row includes the interrupted runs (a few hundred)."
        )

    run_recorded(report, _HOME, args.json, run)


if __name__ == "__main__":
    main()
