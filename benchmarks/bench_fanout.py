"""Fan-out: many concurrent agent calls against a slow provider (not a test: it prints figures).

1. ``--calls`` (default 10,000) agent calls at once on ``FakeModel(delay=0.1)``: wall time against
   the 100 ms floor, and the peak of traced Python memory per in-flight call (``tracemalloc``,
   in a separate pass: tracing slows everything down). Baseline: raw asyncio coroutines that
   sleep 100 ms and echo.
2. The same over real HTTP: ``--http-concurrency`` (default 1,000) calls at once to the
   OpenAI-compatible ``FaultServer`` on 127.0.0.1 answering every request after 100 ms, in a
   separate process (so it has a core of its own): a Kagura agent (``retry=False``) against the
   bare ``openai.AsyncOpenAI`` client built with the same settings as Kagura's own client.

Contenders take turns in one process, for ``--reps`` / ``--http-rounds`` rounds; medians.

    .venv/bin/python benchmarks/bench_fanout.py [--calls 10000] [--http-concurrency 1000]
"""

from __future__ import annotations

import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="kagura-bench-fanout-")
os.environ["KAGURA_HOME"] = _HOME  # recording on writes here, not to ~/.kagura
for _name in ("KAGURA_DB", "KAGURA_RECORD", "KAGURA_MODEL_OVERRIDE"):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from _bench import Report, console, fmt, median  # noqa: E402

from kagura import Agent, _instrument, agent  # noqa: E402
from kagura.observability._recorder import Recorder, default_recorder  # noqa: E402
from kagura.testing import FakeModel  # noqa: E402

Call = Callable[[str], Awaitable[str]]

RAW = "raw asyncio (sleep + echo)"
BARE_OPENAI = "bare openai.AsyncOpenAI"
KAGURA_ON = "Kagura agent, recording on"
KAGURA_OFF = "Kagura agent, recording off"


def prompt(i: int) -> str:
    return f"Question {i}: what is {i} plus {i}?"


@dataclass
class Contender:
    name: str
    call: Call
    recording: bool | None = None  # None: not a Kagura contender
    walls: list[float] = field(default_factory=list)  # seconds to the last result
    flushes: list[float] = field(default_factory=list)  # seconds to flush the recorder after
    peak_bytes: float = 0.0


def recorder() -> Recorder:
    _instrument.ensure_recording()
    found = default_recorder()
    if found is None:
        raise RuntimeError("the default recorder is not installed: is KAGURA_RECORD=0 set?")
    return found


def set_recording(on: bool | None) -> None:
    if on is None:
        return
    if on:
        _instrument.add_sink(recorder())
    else:
        _instrument.remove_sink(recorder())


async def fire(c: Contender, n: int) -> tuple[float, float]:
    """(seconds until every call returned, seconds to flush the recorder afterwards)."""
    set_recording(c.recording)
    gc.collect()
    start = time.perf_counter()
    results = await asyncio.gather(*(c.call(prompt(i)) for i in range(n)))
    wall = time.perf_counter() - start
    flush = 0.0
    if c.recording:
        start = time.perf_counter()
        recorder().flush(timeout=600)
        flush = time.perf_counter() - start
    set_recording(True if c.recording is False else None)
    wrong = sum(1 for i, r in enumerate(results) if r != prompt(i))
    if wrong:  # a check of the harness, not of timing
        raise RuntimeError(f"{c.name}: {wrong} of {n} calls returned a wrong answer")
    return wall, flush


async def traced_peak(c: Contender, n: int) -> float:
    """Peak traced memory above the starting point, per in-flight call, in bytes."""
    set_recording(c.recording)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await asyncio.gather(*(c.call(prompt(i)) for i in range(n)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if c.recording:
        recorder().flush(timeout=600)
    set_recording(True if c.recording is False else None)
    return (peak - base) / n


async def interleave(
    contenders: list[Contender], n: int, rounds: int, say: Callable[[str], None]
) -> None:
    for c in contenders:
        say(f"warm-up: {c.name}")
        await fire(c, min(n, 1000))
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            wall, flush = await fire(c, n)
            c.walls.append(wall)
            c.flushes.append(flush)


def add_rows(
    report: Report, title: str, contenders: list[Contender], n: int, delay: float, memory: bool
) -> None:
    columns = [
        "contender",
        "wall s",
        "× floor",
        "overhead µs/call",
        "best | worst wall s",
        "recorder flush after, s",
    ]
    if memory:
        columns.append("peak KiB per in-flight call")
    table = report.table(title, columns)
    for c in contenders:
        wall = median(c.walls)
        row = [
            c.name,
            fmt(wall, 3),
            f"{wall / delay:.2f}×",
            fmt((wall - delay) / n * 1e6, 1),
            f"{min(c.walls):.3f} | {max(c.walls):.3f}",
            fmt(median(c.flushes), 3) if c.recording else "",
        ]
        if memory:
            row.append(fmt(c.peak_bytes / 1024, 2))
        table.add(*row)
    table.notes.append(
        f"wall: from starting {n:,} calls at once to the last result (median); floor: the "
        f"provider's {delay * 1000:.0f} ms. overhead µs/call: (wall − floor) / calls, i.e. the "
        "event loop's time per call, which is serialised on one core."
    )


# -- 1. FakeModel ------------------------------------------------------------------------------


def kagura_agent(model: FakeModel) -> Agent[[str], str]:
    async def ask(question: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
        """{{ question }}"""

    return agent(model=model)(ask)


async def fake_fanout(args: argparse.Namespace, report: Report, say: Callable[[str], None]) -> None:
    delay = args.delay

    async def raw(text: str) -> str:
        await asyncio.sleep(delay)
        return text

    ask = kagura_agent(FakeModel(delay=delay, record_requests=False))
    contenders = [
        Contender(RAW, raw),
        Contender(KAGURA_ON, ask, recording=True),
        Contender(KAGURA_OFF, ask, recording=False),
    ]
    await interleave(contenders, args.calls, args.reps, say)
    say("tracemalloc pass")
    for c in contenders:
        c.peak_bytes = await traced_peak(c, args.calls)
    add_rows(
        report,
        f"{args.calls:,} concurrent agent calls, FakeModel(delay={delay}) "
        f"(median of {args.reps} rounds)",
        contenders,
        args.calls,
        delay,
        memory=True,
    )
    report.tables[-1].notes.append(
        "peak per in-flight call: the peak of tracemalloc's traced memory during the batch, above "
        "its level at the start, over the number of calls: coroutines, tasks, prompts, spans and "
        "the recorder's queue (Python allocations only), from a separate, traced pass."
    )


# -- 2. HTTP -----------------------------------------------------------------------------------


def serve(delay: float) -> None:
    """The server process: a FaultServer answering every chat request after ``delay`` seconds,
    until stdin closes."""
    from kagura.testing.fault_server import Fault, FaultServer

    # FaultServer listens with asyncio's default backlog of 100: a burst of hundreds of new
    # connections overflows it, the kernel drops SYNs and clients retry after 1 s, 3 s, ...
    # (TcpExtListenOverflows), which would measure the kernel's retransmission timer instead of
    # the clients. Give this process's listening socket a deep backlog (net.core.somaxconn caps it).
    start_server = asyncio.start_server

    async def deep_backlog(*args: Any, **kwargs: Any) -> asyncio.Server:
        kwargs.setdefault("backlog", 4096)
        return await start_server(*args, **kwargs)

    asyncio.start_server = deep_backlog  # type: ignore[assignment]

    async def run() -> None:
        server = FaultServer(rules=[("", Fault("ok", delay=delay))])  # "" matches every prompt
        async with server:
            print(server.base_url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(run())


async def http_fanout(args: argparse.Namespace, report: Report, say: Callable[[str], None]) -> None:
    from openai import AsyncOpenAI

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--delay", str(args.delay)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        if not base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fault server did not start (said {base_url!r})")
        # The same client settings as Kagura's own (kagura.providers.openai._client): no SDK
        # retries, a long timeout, the SDK's default connection pool.
        client = AsyncOpenAI(api_key="bench", base_url=base_url, max_retries=0, timeout=600.0)

        async def bare(text: str) -> str:
            completion = await client.chat.completions.create(
                model="fault-model", messages=[{"role": "user", "content": text}]
            )
            return completion.choices[0].message.content or ""

        async def ask(question: str) -> str:  # type: ignore[empty-body]
            """{{ question }}"""

        kagura = agent(model="fault-model", base_url=base_url, api_key="bench", retry=False)(ask)
        contenders = [
            Contender(BARE_OPENAI, bare),
            Contender(KAGURA_ON, kagura, recording=True),
            Contender(KAGURA_OFF, kagura, recording=False),
        ]
        await interleave(contenders, args.http_concurrency, args.http_rounds, say)
        await client.close()
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    add_rows(
        report,
        f"{args.http_concurrency:,} concurrent calls over HTTP to FaultServer on 127.0.0.1 "
        f"({args.delay * 1000:.0f} ms answer delay; median of {args.http_rounds} rounds)",
        contenders,
        args.http_concurrency,
        args.delay,
        memory=False,
    )
    report.tables[-1].notes.append(
        "The server runs in its own process. Both clients use the openai SDK's default "
        "connection pool (httpx: at most 1,000 connections, 100 kept alive), so each round opens "
        "new connections beyond the 100 kept from the round before."
    )


async def main_async(args: argparse.Namespace, report: Report) -> None:
    out = console()

    def say(text: str) -> None:
        out.print(text, style="dim")

    if not args.skip_fake:
        await fake_fanout(args, report, say)
    if not args.skip_http:
        await http_fanout(args, report, say)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000, help="concurrent FakeModel calls")
    parser.add_argument("--delay", type=float, default=0.1, help="provider latency, seconds")
    parser.add_argument("--reps", type=int, default=5, help="rounds of the FakeModel fan-out")
    parser.add_argument("--http-concurrency", type=int, default=1000, help="concurrent HTTP calls")
    parser.add_argument("--http-rounds", type=int, default=5, help="rounds of the HTTP fan-out")
    parser.add_argument("--skip-fake", action="store_true", help="skip the FakeModel fan-out")
    parser.add_argument("--skip-http", action="store_true", help="skip the HTTP fan-out")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        try:
            serve(args.delay)
        finally:
            shutil.rmtree(_HOME, ignore_errors=True)
        return

    report = Report(
        name="fanout",
        title="Fan-out: concurrent agent calls against a slow provider",
        command="python benchmarks/bench_fanout.py",
        description=(
            "Every call is started at once with `asyncio.gather`; the provider answers after "
            f"{args.delay * 1000:.0f} ms, so the floor is {args.delay * 1000:.0f} ms of wall "
            "time and everything above it is client-side work on the one event loop. Kagura "
            "agents run with the default settings (recording on writes to a temporary "
            "`KAGURA_HOME`); over HTTP with `retry=False`, like the bare client."
        ),
        params={
            "calls": args.calls,
            "delay_s": args.delay,
            "reps": args.reps,
            "http_concurrency": args.http_concurrency,
            "http_rounds": args.http_rounds,
        },
    )
    started = time.perf_counter()
    try:
        asyncio.run(main_async(args, report))
    finally:
        found = default_recorder()
        if found is not None:
            found.close()
        shutil.rmtree(_HOME, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    report.print(console())
    report.save(args.json)


if __name__ == "__main__":
    main()
