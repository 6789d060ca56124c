"""What recording costs.

1. Recorder throughput: spans (start + finish) pushed straight into a Recorder writing to a fresh
   SQLite file, timed until everything is on disk: rows per second, batched.
2. Overhead per agent step: the same workflow (three agents in parallel, then one over their
   results) on the zero-latency fake model, recording on and off, alternated in one run.
3. The first query after a burst: ``--burst`` spans (default 10,000) recorded and flushed, then
   one query of the store, timed: what a reader pays for the writer's work left undone.

Run: .venv/bin/python benchmarks/bench_recording.py [--spans N] [--runs R] [--rounds K] [--burst B]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from kagura import _instrument, agent, workflow
from kagura._context import new_id
from kagura._events import SpanFinished, SpanStarted
from kagura._usage import Usage
from kagura.observability import EventStore, Recorder


def push(recorder: Recorder, spans: int) -> None:
    """``spans`` agent spans (start and finish) into ``recorder``, as one run."""
    run_id = new_id()
    for i in range(spans):
        span_id = new_id()
        now = time.time_ns()
        started = SpanStarted(span_id, run_id, run_id, "agent", "bench", f"bench#{i}", now)
        recorder.handle(started)
        recorder.handle(
            SpanFinished(
                span_id,
                run_id,
                run_id,
                "agent",
                "bench",
                f"bench#{i}",
                now,
                now + 1000,
                "completed",
                usage=Usage(10, 5),
                cost_usd=0.0,
                attributes={"output": "ok"},
            )
        )


def recorder_throughput(spans: int) -> tuple[float, float]:
    """(rows per second, seconds) for ``spans`` spans through a Recorder into SQLite."""
    with tempfile.TemporaryDirectory() as home:
        recorder = Recorder(str(Path(home) / "bench.db"))
        assert recorder.flush(), "the recorder did not start"
        start = time.perf_counter()
        push(recorder, spans)
        queued = time.perf_counter() - start
        recorder.flush(timeout=600)
        elapsed = time.perf_counter() - start
        recorder.close()
        assert recorder.written_spans == spans, recorder.written_spans
    print(f"  queueing on the caller's thread: {queued / spans * 1e6:.2f} µs per span")
    return spans / elapsed, elapsed


@agent(model="fake")
async def step(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """{{ text }}"""


@workflow
async def fan_in(text: str) -> str:
    a, b, c = await asyncio.gather(step(text), step(text), step(text))
    return await step(a + b + c)


async def per_step_us(runs: int) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(fan_in("x") for _ in range(runs)))
    return (time.perf_counter() - started) / (runs * 4) * 1e6


async def overhead(runs: int, rounds: int, db: str) -> tuple[float, float]:
    recorder = Recorder(db)
    _instrument.mark_recording_checked()  # this benchmark installs and removes the sink itself
    await per_step_us(200)  # warm-up: imports, caches
    off: list[float] = []
    on: list[float] = []
    for _ in range(rounds):
        off.append(await per_step_us(runs))
        _instrument.add_sink(recorder)
        on.append(await per_step_us(runs))
        recorder.flush()  # the writer's work for this round is charged to this round
        _instrument.remove_sink(recorder)
    recorder.close()
    return statistics.median(off), statistics.median(on)


def first_query_after_burst(spans: int) -> tuple[float, float]:
    """(seconds to flush, seconds for the first query) after ``spans`` spans are recorded."""
    with tempfile.TemporaryDirectory() as home:
        db = str(Path(home) / "burst.db")
        recorder = Recorder(db)
        assert recorder.flush(), "the recorder did not start"
        store = EventStore(db)
        store.get_executions(limit=1)  # the store opened: only the query is timed below
        push(recorder, spans)
        start = time.perf_counter()
        assert recorder.flush(timeout=600)
        flushed = time.perf_counter()
        found = store.get_executions(kind="agent", limit=10)
        queried = time.perf_counter()
        recorder.close()
        assert len(found) == 10
    return flushed - start, queried - flushed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--burst", type=int, default=10_000)
    args = parser.parse_args()

    print(f"Recorder throughput ({args.spans:,} spans, SQLite, batched):")
    rate, seconds = recorder_throughput(args.spans)
    print(f"  {rate:,.0f} spans/s written ({seconds:.2f} s)")

    print(f"\nOverhead per agent step ({args.runs} runs x 4 steps, median of {args.rounds}):")
    with tempfile.TemporaryDirectory() as home:
        off, on = asyncio.run(overhead(args.runs, args.rounds, str(Path(home) / "o.db")))
    print(f"  recording off: {off:8.1f} µs/step")
    print(f"  recording on:  {on:8.1f} µs/step   ({on / off:.2f}x off, +{on - off:.1f} µs)")

    print(f"\nFirst query after a burst of {args.burst:,} spans (SQLite):")
    flush_s, query_s = first_query_after_burst(args.burst)
    print(f"  flush: {flush_s:.3f} s, then the first query: {query_s:.3f} s")


if __name__ == "__main__":
    main()
