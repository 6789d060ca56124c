"""The event store: rows per second through the recorder, and ``kagura monitor stats`` over
1,000,000 recorded agent calls (not a test: it prints figures).

1. Recorder throughput: ``--runs`` recorded workflow runs (default 20,000), each a workflow span
   with four agent calls and their LLM attempts (9 spans, 18 events, with the attributes the real
   instrumentation attaches), handed to a ``Recorder`` writing to a fresh SQLite file, timed until
   everything is on disk, and until it is in the indexed tables. The events are built first,
   outside the timing.
2. A store of ``--executions`` agent calls (default 1,000,000: what ``kagura monitor stats`` counts
   as executions) with their LLM attempts (a few retried) and workflow runs (four calls each),
   spread over 30 days, with a realistic mix of names, models, statuses, durations and tokens. It
   is built quickly with ``executemany`` straight into ``kagura_spans`` (the schema is Kagura's
   own; its indexes are dropped during the load and created again after), then its rollups are
   built from the spans, as an upgrade builds them. Then
   ``kagura monitor stats --db PATH`` is timed as a subprocess (the whole command, interpreter
   start included), and ``EventStore.stats()`` in-process.

    .venv/bin/python benchmarks/bench_store.py [--runs 20000] [--executions 1000000] [--store PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _bench import Report, console, fmt, median

from kagura._events import Event, SpanFinished, SpanStarted
from kagura._storage import dispose_all, engine_for, normalise_url, rebuild_rollups
from kagura._usage import Usage
from kagura.observability import EventStore, Recorder
from kagura.observability._writer import SPAN_COLUMNS as COLUMNS

DAY = 86_400.0

WORKFLOWS: dict[str, tuple[str, ...]] = {
    "support_triage": ("classify", "extract_entities", "sentiment", "draft_reply"),
    "research_digest": ("search_summary", "fact_check", "cite_sources", "write_digest"),
    "code_review": ("lint_explain", "find_bugs", "suggest_tests", "review_summary"),
    "translate_doc": ("translate_fr", "translate_de", "translate_ja", "consistency_check"),
    "lead_scoring": ("enrich_company", "score_fit", "score_intent", "recommend_action"),
    "meeting_notes": ("transcribe_clean", "action_items", "decisions", "notes_summary"),
}
#: (model id, weight, USD per 1M prompt tokens, USD per 1M completion tokens; None: unknown price)
MODELS: tuple[tuple[str, float, float | None, float | None], ...] = (
    ("openai/gpt-4o-mini", 0.45, 0.15, 0.60),
    ("openai/gpt-4o", 0.15, 2.50, 10.00),
    ("anthropic/claude-3-5-haiku", 0.15, 0.80, 4.00),
    ("local/smollm2", 0.15, 0.0, 0.0),
    ("openrouter/mistral-small", 0.10, None, None),
)
#: (status, weight, error type, error text) of an agent call.
OUTCOMES: tuple[tuple[str, float, str | None, str | None], ...] = (
    ("completed", 0.955, None, None),
    ("failed", 0.030, "ProviderError", "service unavailable (HTTP 503)"),
    ("timed_out", 0.010, "ProviderTimeout", "no answer within 30s"),
    ("cancelled", 0.005, "CancelledError", "CancelledError"),
)
RETRY_SHARE = 0.04  # agent calls whose first LLM attempt failed and was retried

# -- 1. recorder throughput --------------------------------------------------------------------


def recorder_events(runs: int) -> tuple[list[Event], int]:
    """The events of ``runs`` workflow runs (9 spans each) as the instrumentation emits them."""
    events: list[Event] = []
    spans = 0
    counter = 0
    now = time.time_ns()
    names = WORKFLOWS["support_triage"]

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"benchrecorder{counter:010x}"

    for r in range(runs):
        run_id = new_id()
        t = now + r * 1_000_000
        events.append(
            SpanStarted(run_id, None, run_id, "workflow", "support_triage", "support_triage", t)
        )
        for i, name in enumerate(names):
            agent_id, llm_id = new_id(), new_id()
            key = f"support_triage/{name}#0"
            text = f"ticket {r}: the printer on floor {i} is out of toner again"
            messages = ({"role": "user", "content": f"{name}: {text}"},)
            events.append(
                SpanStarted(
                    agent_id,
                    run_id,
                    run_id,
                    "agent",
                    name,
                    key,
                    t,
                    {"model": "openai/gpt-4o-mini", "inputs": {"text": text}},
                )
            )
            model = "openai/gpt-4o-mini"
            events.append(
                SpanStarted(
                    llm_id,
                    agent_id,
                    run_id,
                    "llm",
                    model,
                    f"{key}/{model}#0",
                    t,
                    {"model": model, "messages": messages},
                )
            )
            usage = Usage(120, 30)
            events.append(
                SpanFinished(
                    llm_id,
                    agent_id,
                    run_id,
                    "llm",
                    model,
                    f"{key}/{model}#0",
                    t,
                    t + 900_000_000,
                    "completed",
                    usage=usage,
                    cost_usd=3.6e-5,
                    attributes={
                        "model": model,
                        "response_model": "gpt-4o-mini-2024-07-18",
                        "output": "billing",
                        "finish_reason": "stop",
                    },
                )
            )
            events.append(
                SpanFinished(
                    agent_id,
                    run_id,
                    run_id,
                    "agent",
                    name,
                    key,
                    t,
                    t + 901_000_000,
                    "completed",
                    usage=usage,
                    cost_usd=3.6e-5,
                    attributes={"output": "billing", "answered_by": model},
                )
            )
        events.append(
            SpanFinished(
                run_id,
                None,
                run_id,
                "workflow",
                "support_triage",
                "support_triage",
                t,
                t + 2_000_000_000,
                "completed",
                attributes={"output": "done"},
            )
        )
        spans += 1 + 2 * len(names)
    return events, spans


def recorder_throughput(runs: int, directory: Path) -> tuple[int, float, float, float]:
    """(spans written, seconds on the caller's thread, seconds until all were on disk, seconds
    until all were in the indexed tables: the same, since the writer writes straight into
    them)."""
    events, spans = recorder_events(runs)
    recorder = Recorder(str(directory / "throughput.db"))
    if not recorder.flush():
        raise RuntimeError("the recorder could not open its store")
    start = time.perf_counter()
    for event in events:
        recorder.handle(event)
    queued = time.perf_counter() - start
    if not recorder.flush(timeout=600):
        raise RuntimeError("the recorder did not flush")
    durable = time.perf_counter() - start
    indexed = time.perf_counter() - start
    recorder.close()
    if recorder.written_spans != spans:
        raise RuntimeError(f"{recorder.written_spans} spans written, {spans} expected")
    return spans, queued, durable, indexed


# -- 2. a large store --------------------------------------------------------------------------


@dataclass
class StoreCounts:
    agents: int = 0
    llm: int = 0
    workflows: int = 0

    @property
    def rows(self) -> int:
        return self.agents + self.llm + self.workflows


def store_rows(executions: int, seed: int, counts: StoreCounts) -> Iterator[tuple[Any, ...]]:
    """Rows of ``kagura_spans``, in the column order of ``COLUMNS`` (the recorder's)."""
    rng = random.Random(seed)
    now = time.time()
    pid = 4242
    counter = 0
    workflow_names = list(WORKFLOWS)
    model_weights = [m[1] for m in MODELS]
    outcome_weights = [o[1] for o in OUTCOMES]

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"benchstore00{counter:010x}"

    for _ in range(executions // 4):
        wf_name = rng.choice(workflow_names)
        run_id = new_id()
        wf_start = now - rng.random() * 30 * DAY
        wf = {"prompt": 0, "completion": 0, "cost": 0.0, "calls": 0, "retries": 0, "end": wf_start}
        cost_known = True
        wf_failed: tuple[str, str] | None = None
        for i, name in enumerate(WORKFLOWS[wf_name]):
            agent_id = new_id()
            model, _, p_price, c_price = rng.choices(MODELS, weights=model_weights)[0]
            status, _, error_type, error = rng.choices(OUTCOMES, weights=outcome_weights)[0]
            agent_start = wf_start + 0.001 if i < 3 else wf["end"] + 0.001
            key = f"{wf_name}/{name}#0"
            inputs = f'{{"text": "request {counter} for {name}"}}'
            t = agent_start
            retried = rng.random() < RETRY_SHARE
            prompt = completion = 0
            cost: float | None = 0.0
            attempts = 2 if retried else 1
            for a in range(attempts):
                llm_ms = rng.lognormvariate(math.log(900), 0.7)
                last = a == attempts - 1
                llm_status = status if last else "failed"
                p = rng.randint(80, 1500) if llm_status == "completed" else 0
                c = rng.randint(10, 400) if llm_status == "completed" else 0
                llm_cost = None if p_price is None else (p * p_price + c * (c_price or 0.0)) / 1e6
                prompt, completion = prompt + p, completion + c
                cost = None if cost is None or llm_cost is None else cost + llm_cost
                counts.llm += 1
                yield (
                    new_id(),
                    run_id,
                    agent_id,
                    "llm",
                    model,
                    f"{key}/{model}#{a}",
                    llm_status,
                    t,
                    t + llm_ms / 1000,
                    llm_ms,
                    model,
                    p,
                    c,
                    p + c,
                    llm_cost,
                    1,
                    0,
                    None if llm_status == "completed" else (error or "rate limit reached"),
                    None if llm_status == "completed" else (error_type or "ProviderError"),
                    None,
                    "ok" if llm_status == "completed" else None,
                    None,
                    pid,
                    "bench-host",
                    None,
                    name,
                )
                t += llm_ms / 1000 + (0.5 if not last else 0.0)  # the retry's backoff
            agent_ms = (t - agent_start) * 1000 + rng.uniform(0.05, 0.4)
            counts.agents += 1
            yield (
                agent_id,
                run_id,
                run_id,
                "agent",
                name,
                key,
                status,
                agent_start,
                agent_start + agent_ms / 1000,
                agent_ms,
                model,
                prompt,
                completion,
                prompt + completion,
                cost,
                attempts,
                attempts - 1,
                error,
                error_type,
                inputs,
                '"ok"' if status == "completed" else None,
                None,
                pid,
                "bench-host",
                None,
                None,
            )
            wf["end"] = max(wf["end"], agent_start + agent_ms / 1000)
            wf["prompt"] += prompt
            wf["completion"] += completion
            wf["calls"] += attempts
            wf["retries"] += attempts - 1
            if cost is None:
                cost_known = False
            else:
                wf["cost"] += cost
            if status != "completed" and wf_failed is None:
                wf_failed = (status, error_type or "")
        wf_ms = (wf["end"] - wf_start) * 1000 + 0.2
        counts.workflows += 1
        yield (
            run_id,
            run_id,
            None,
            "workflow",
            wf_name,
            wf_name,
            "completed" if wf_failed is None else wf_failed[0],
            wf_start,
            wf_start + wf_ms / 1000,
            wf_ms,
            None,
            wf["prompt"],
            wf["completion"],
            wf["prompt"] + wf["completion"],
            wf["cost"] if cost_known else None,
            wf["calls"],
            wf["retries"],
            None if wf_failed is None else "a step failed",
            None if wf_failed is None else wf_failed[1],
            '{"args": ["..."], "kwargs": {}}',
            '"done"' if wf_failed is None else None,
            None,
            pid,
            "bench-host",
            None,
            None,
        )


def build_rollups(url: str) -> float:
    """Fill the store's rollup tables from its spans (rows inserted straight into the spans
    table bypass the writer, which keeps them as it writes), as Kagura does once when it
    upgrades a store made before them. The seconds it took."""
    engine = engine_for(url)
    start = time.perf_counter()
    with engine.begin() as connection:
        rebuild_rollups(connection)
    seconds = time.perf_counter() - start
    dispose_all()
    return seconds


def build_store(
    path: Path, executions: int, seed: int, phases: dict[str, float] | None = None
) -> StoreCounts:
    """A SQLite event store with Kagura's schema holding ``executions`` agent calls (and its
    rollups); the seconds spent inserting the rows,
    creating the indexes and building the rollups go into ``phases`` when given."""
    url = normalise_url(path)
    engine_for(url)  # Kagura creates its schema (tables and indexes)
    dispose_all()
    counts = StoreCounts()
    connection = sqlite3.connect(path)
    try:
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master "
            "WHERE type = 'index' AND tbl_name = 'kagura_spans' AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        connection.execute("PRAGMA synchronous = OFF")
        insert = (
            f"INSERT INTO kagura_spans ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in COLUMNS)})"
        )
        rows = store_rows(executions, seed, counts)
        start = time.perf_counter()
        with connection:
            while True:
                chunk = [row for _, row in zip(range(100_000), rows, strict=False)]
                if not chunk:
                    break
                connection.executemany(insert, chunk)
        loaded = time.perf_counter()
        with connection:
            for _, sql in indexes:
                connection.execute(sql)
        if phases is not None:
            phases["rows"] = loaded - start
            phases["indexes"] = time.perf_counter() - loaded
    finally:
        connection.close()
    rollups = build_rollups(url)
    if phases is not None and rollups is not None:
        phases["rollups"] = rollups
    return counts


# -- timing the reads --------------------------------------------------------------------------


def kagura_command() -> list[str]:
    script = Path(sys.executable).with_name("kagura")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from kagura.cli import main; sys.exit(main())"]


def time_cli(args: list[str], reps: int, env: dict[str, str]) -> tuple[list[float], str]:
    times: list[float] = []
    output = ""
    for _ in range(reps):
        start = time.perf_counter()
        done = subprocess.run(
            [*kagura_command(), *args], env=env, capture_output=True, text=True, check=False
        )
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"kagura {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
        output = done.stdout
    return times, output


def time_in_process(path: Path, reps: int, **kwargs: Any) -> tuple[list[float], dict[str, Any]]:
    times: list[float] = []
    result: dict[str, Any] = {}
    for _ in range(reps):
        store = EventStore(path)
        start = time.perf_counter()
        result = store.stats(**kwargs)
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000, help="runs through the recorder")
    parser.add_argument("--executions", type=int, default=1_000_000, help="agent calls in store")
    parser.add_argument("--reps", type=int, default=3, help="timed stats calls per variant")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument(
        "--store",
        metavar="PATH",
        help="keep the large store here (reused as it is when the file exists)",
    )
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()
    say = console()
    report = Report(
        name="store",
        title="The event store",
        command="python benchmarks/bench_store.py",
        description=(
            "Rows per second through the `Recorder` into SQLite, and the time of "
            f"`kagura monitor stats` over a store of {args.executions:,} recorded agent calls "
            "(the executions it counts), with their LLM attempts and workflow runs."
        ),
        params={"runs": args.runs, "executions": args.executions, "reps": args.reps},
    )
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="kagura-bench-store-"))
    try:
        say.print(f"recorder: {args.runs:,} runs ...", style="dim")
        spans, queued, durable, indexed = recorder_throughput(args.runs, workdir)
        table = report.table(
            f"Recorder throughput ({args.runs:,} workflow runs, {spans:,} spans, SQLite)",
            ["measure", "value"],
        )
        table.add("rows (spans) on disk per second", fmt(spans / durable, 0))
        table.add("seconds until all on disk", fmt(durable, 2))
        table.add("rows (spans) in the indexed tables per second", fmt(spans / indexed, 0))
        table.add("seconds until all in the indexed tables", fmt(indexed, 2))
        table.add("µs per span on the caller's thread (queueing)", fmt(queued / spans * 1e6, 2))
        table.notes.append(
            "Records go in through `Recorder.handle` (record objects, as a producer other than "
            "Kagura's own instrumentation would send them) and are written by the recorder's "
            "writer process. On disk: the flush has returned, every batch committed straight "
            "into the indexed tables (one row per span in `kagura_spans`, with its four "
            "indexes), so both figures are the same time."
        )

        path = Path(args.store) if args.store else workdir / "million.db"
        if path.exists():
            say.print(f"reusing the store at {path}", style="dim")
            counts = None
            build_seconds = 0.0
        else:
            say.print(f"building a store of {args.executions:,} agent calls ...", style="dim")
            start = time.perf_counter()
            counts = build_store(path, args.executions, args.seed)
            build_seconds = time.perf_counter() - start
        size_mib = sum(
            p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file()
        ) / (1024 * 1024)

        env = {k: v for k, v in os.environ.items() if not k.startswith("KAGURA_")}
        env["KAGURA_HOME"] = str(workdir)  # nothing but --db is read
        env["COLUMNS"] = "120"
        say.print("timing kagura monitor stats ...", style="dim")
        cli_all, output = time_cli(["monitor", "stats", "--db", str(path)], args.reps, env)
        cli_day, _ = time_cli(
            ["monitor", "stats", "--db", str(path), "--since", "1d"], args.reps, env
        )
        agent = WORKFLOWS["support_triage"][0]
        cli_agent, _ = time_cli(
            ["monitor", "stats", "--db", str(path), "--agent", agent], args.reps, env
        )
        say.print("timing EventStore.stats() ...", style="dim")
        inproc, stats = time_in_process(path, args.reps)
        base, _ = time_cli(["--help"], args.reps, env)

        executions = int(stats["executions"])
        title = f"kagura monitor stats over {executions:,} recorded agent calls"
        if counts is not None:
            title += (
                f" ({counts.rows:,} rows: {counts.agents:,} agent calls, {counts.llm:,} LLM "
                f"attempts, {counts.workflows:,} workflow runs; {size_mib:,.0f} MiB; built in "
                f"{build_seconds:.0f} s)"
            )
        table = report.table(title, ["command", "s (median)", "first | best | worst"])

        def row(name: str, times: list[float]) -> None:
            table.add(
                name,
                fmt(median(times), 3),
                f"{times[0]:.3f} | {min(times):.3f} | {max(times):.3f}",
            )

        row("kagura monitor stats --db PATH", cli_all)
        row("kagura monitor stats --db PATH --since 1d", cli_day)
        row(f"kagura monitor stats --db PATH --agent {agent}", cli_agent)
        row("EventStore(PATH).stats() in-process", inproc)
        row("kagura --help (the CLI's start-up, for reference)", base)
        table.notes.append(
            f"Median of {args.reps} runs each; the CLI rows are whole processes (interpreter "
            "start, imports, query, rendering). The file was just written, so it is in the page "
            "cache: these are warm-cache figures."
        )
        report.line(
            f"Store: {executions:,} agent calls, failure rate {stats['failure_rate']:.2%}, "
            f"p50/p95/p99 {stats['latency_ms']['p50']:.0f}/{stats['latency_ms']['p95']:.0f}/"
            f"{stats['latency_ms']['p99']:.0f} ms, {stats['workflow_runs']:,} workflow runs"
        )
        if not output.strip():
            report.line("NOTE: `kagura monitor stats` printed nothing")
    finally:
        dispose_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report.finish(started, args.json)


if __name__ == "__main__":
    main()
