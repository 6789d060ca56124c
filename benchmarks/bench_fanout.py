"""Fan-out: many concurrent agent calls against a slow provider (not a test: it prints figures).

1. ``--calls`` (default 10,000) agent calls at once on ``FakeModel(delay=0.1)``: wall time against
   the 100 ms floor, and the peak of traced Python memory per in-flight call (``tracemalloc``,
   in a separate pass: tracing slows everything down). Baseline: raw asyncio coroutines that
   sleep 100 ms and echo.
2. The same over real HTTP: ``--http-concurrency`` (default 100, then 1,000) calls at once to the
   OpenAI-compatible ``FaultServer`` on 127.0.0.1 answering every request after 100 ms, in a
   separate process (so it has a core of its own): a Kagura agent (``retry=False``) against the
   bare ``openai.AsyncOpenAI`` client built with the same settings as Kagura's own client.

Contenders take turns in one process, for ``--reps`` / ``--http-rounds`` rounds (batches of fewer
than 1,000 HTTP calls get up to 4 times as many rounds: they are short and noisy); medians.

    .venv/bin/python benchmarks/bench_fanout.py [--calls 10000] [--http-concurrency 100,1000]
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
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from _bench import Report, ServerProcess, console, fmt, median, run_recorded  # noqa: E402

from kagura import Agent, _instrument, _recording, agent  # noqa: E402
from kagura.observability._recorder import Recorder, default_recorder  # noqa: E402
from kagura.providers.openai import KEEPALIVE_SECONDS, MAX_CONNECTIONS  # noqa: E402
from kagura.testing import FakeModel  # noqa: E402

Call = Callable[[str], Awaitable[str]]

RAW = "raw asyncio (sleep + echo)"
BARE_OPENAI = "bare openai.AsyncOpenAI (its default httpx2 client)"
BARE_AIOHTTP = "bare openai.AsyncOpenAI + DefaultAioHttpClient"
AIOHTTP_ALONE = "aiohttp alone (no SDK; JSON body in, JSON answer out)"
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
    client_cpu: list[float] = field(default_factory=list)  # CPU seconds of this process
    server_cpu: list[float] = field(default_factory=list)  # CPU seconds of the server process
    peak_bytes: float = 0.0


def recorder() -> Recorder:
    _recording.ensure_recording()
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


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux), else 0."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fire(c: Contender, n: int, server_pid: int | None = None) -> tuple[float, float]:
    """(seconds until every call returned, seconds to flush the recorder afterwards); also
    notes the CPU time of this process and of the server process during the calls."""
    set_recording(c.recording)
    gc.collect()
    server_before = process_cpu(server_pid)
    cpu_before = time.process_time()
    start = time.perf_counter()
    results = await asyncio.gather(*(c.call(prompt(i)) for i in range(n)))
    wall = time.perf_counter() - start
    c.client_cpu.append(time.process_time() - cpu_before)
    c.server_cpu.append(process_cpu(server_pid) - server_before)
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
    contenders: list[Contender],
    n: int,
    rounds: int,
    say: Callable[[str], None],
    server_pid: int | None = None,
) -> None:
    for c in contenders:
        say(f"warm-up: {c.name}")
        await fire(c, min(n, 1000), server_pid)
        c.client_cpu.clear()
        c.server_cpu.clear()
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            wall, flush = await fire(c, n, server_pid)
            c.walls.append(wall)
            c.flushes.append(flush)


def add_rows(
    report: Report,
    title: str,
    contenders: list[Contender],
    n: int,
    delay: float,
    *,
    memory: bool,
    server: bool,
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
    if server:
        columns += ["client CPU s", "client CPU ms/call", "server CPU s"]
    table = report.table(title, columns)
    base = median(contenders[0].walls) - delay
    for c in contenders:
        wall = median(c.walls)
        row = [
            c.name,
            fmt(wall, 3),
            f"{wall / delay:.2f}×",
            f"{fmt((wall - delay) / n * 1e6, 1)} ({(wall - delay) / base:.2f}×)",
            f"{min(c.walls):.3f} | {max(c.walls):.3f}",
            fmt(median(c.flushes), 3) if c.recording else "",
        ]
        if memory:
            row.append(fmt(c.peak_bytes / 1024, 2))
        if server:
            row += [
                fmt(median(c.client_cpu), 2),
                fmt(median(c.client_cpu) / n * 1000, 2),
                fmt(median(c.server_cpu), 2),
            ]
        table.add(*row)
    table.notes.append(
        f"wall: from starting {n:,} calls at once to the last result (median); floor: the "
        f"provider's {delay * 1000:.0f} ms. overhead µs/call: (wall − floor) / calls, i.e. the "
        "event loop's time per call, which is serialised on one core; in brackets, against the "
        "first row."
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
        server=False,
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

    async def run() -> None:
        # "" matches every prompt. A deep listen backlog (net.core.somaxconn caps it): with
        # asyncio's default of 100, a burst of hundreds of new connections overflows it, the
        # kernel drops SYNs and clients retry after 1 s, 3 s, ... (TcpExtListenOverflows), which
        # would measure the kernel's retransmission timer instead of the clients.
        server = FaultServer(rules=[("", Fault("ok", delay=delay))], backlog=4096)
        async with server:
            print(server.base_url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(run())


async def http_fanout(
    args: argparse.Namespace, report: Report, say: Callable[[str], None], server: ServerProcess
) -> None:
    import aiohttp
    from openai import AsyncOpenAI, DefaultAioHttpClient

    # What a user of the SDK writes: no SDK retries and a long timeout (as Kagura's own client),
    # the SDK's default HTTP client, or its aiohttp one with its default pool.
    client = AsyncOpenAI(api_key="bench", base_url=server.base_url, max_retries=0, timeout=600.0)
    aio_client = AsyncOpenAI(
        api_key="bench",
        base_url=server.base_url,
        max_retries=0,
        timeout=600.0,
        http_client=DefaultAioHttpClient(),
    )

    def bare_call(sdk: AsyncOpenAI) -> Call:
        async def bare(text: str) -> str:
            completion = await sdk.chat.completions.create(
                model="fault-model", messages=[{"role": "user", "content": text}]
            )
            return completion.choices[0].message.content or ""

        return bare

    # What the SDK's transport costs beneath the SDK: the same request and answer, through an
    # aiohttp session with Kagura's pool settings, and nothing else.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS),
        headers={"Authorization": "Bearer bench"},
    )
    url = server.base_url.rstrip("/") + "/chat/completions"

    async def alone(text: str) -> str:
        body = {"model": "fault-model", "messages": [{"role": "user", "content": text}]}
        async with session.post(url, json=body) as response:
            response.raise_for_status()
            completion = await response.json()
        return str(completion["choices"][0]["message"]["content"] or "")

    async def ask(question: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
        """{{ question }}"""

    kagura = agent(model="fault-model", base_url=server.base_url, api_key="bench", retry=False)(ask)
    try:
        for concurrency in args.http_concurrency:
            contenders = [
                Contender(BARE_OPENAI, bare_call(client)),
                Contender(BARE_AIOHTTP, bare_call(aio_client)),
                Contender(AIOHTTP_ALONE, alone),
                Contender(KAGURA_ON, kagura, recording=True),
                Contender(KAGURA_OFF, kagura, recording=False),
            ]
            # Small batches are short and noisy: give them more rounds (up to 4x).
            rounds = args.http_rounds * max(1, min(4, 1000 // concurrency))
            say(f"HTTP, {concurrency} concurrent calls, {rounds} rounds")
            await interleave(contenders, concurrency, rounds, say, server.pid)
            add_rows(
                report,
                f"{concurrency:,} concurrent calls over HTTP to FaultServer on 127.0.0.1 "
                f"({args.delay * 1000:.0f} ms answer delay; median of {rounds} rounds)",
                contenders,
                concurrency,
                args.delay,
                memory=False,
                server=True,
            )
            if concurrency >= 1000:
                kagura_on = next(c for c in contenders if c.name == KAGURA_ON)
                bare_wall, wall = median(contenders[0].walls), median(kagura_on.walls)
                report.check(
                    f"Kagura agent ≥ 3× faster than the bare SDK (default client) at "
                    f"{concurrency:,} concurrent calls",
                    bare_wall / wall >= 3,
                    f"{bare_wall / wall:.2f}× ({wall:.3f} s against {bare_wall:.3f} s)",
                )
                cpu_ms = median(kagura_on.client_cpu) / concurrency * 1000
                report.check(
                    "Kagura agent's client CPU ≤ 0.5 ms per call",
                    cpu_ms <= 0.5,
                    f"{cpu_ms:.2f} ms (recording on; the SDK with aiohttp: "
                    f"{median(contenders[1].client_cpu) / concurrency * 1000:.2f} ms, "
                    f"aiohttp alone: "
                    f"{median(contenders[2].client_cpu) / concurrency * 1000:.2f} ms)",
                )
    finally:
        await client.close()
        await aio_client.close()
        await session.close()
    report.tables[-1].notes.append(
        "The server runs in its own process, with a listen backlog of 4,096 (asyncio's default "
        "of 100 overflows under a burst of new connections, and the kernel's SYN retransmission "
        "timer, 1 s, would be what is measured). The SDK's default client keeps 100 connections "
        "alive (at most 1,000 open), so a round of more than 100 calls opens new ones beyond the "
        "100 kept from the round before, and its connection pool's bookkeeping grows with the "
        "connections in it; its aiohttp client keeps every idle connection. Kagura sends its "
        "requests with aiohttp itself, with a pool of up to 1,000 connections kept 30 s, and no "
        "SDK in between. aiohttp alone is the floor beneath both: the same request and answer "
        "and nothing else. Above it, the SDK's own work per request (its request options, "
        "httpx2's request and response objects, their conversion to and from aiohttp's), or "
        "Kagura's (the agent, its policies, its recording). client CPU / server CPU: CPU "
        "seconds each process used during a round (median); ms/call: the client's, per call."
    )


async def main_async(
    args: argparse.Namespace, report: Report, server: ServerProcess | None
) -> None:
    out = console()

    def say(text: str) -> None:
        out.print(text, style="dim")

    if not args.skip_fake:
        await fake_fanout(args, report, say)
    if server is not None:
        await http_fanout(args, report, say, server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000, help="concurrent FakeModel calls")
    parser.add_argument("--delay", type=float, default=0.1, help="provider latency, seconds")
    parser.add_argument("--reps", type=int, default=5, help="rounds of the FakeModel fan-out")
    parser.add_argument(
        "--http-concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[100, 1000],
        help="concurrent HTTP calls, comma-separated for several batches (default 100,1000)",
    )
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
            "http_concurrency": ",".join(str(n) for n in args.http_concurrency),
            "http_rounds": args.http_rounds,
        },
    )

    def run() -> None:
        if args.skip_http:
            asyncio.run(main_async(args, report, None))
        else:
            with ServerProcess(__file__, "--delay", str(args.delay)) as server:
                asyncio.run(main_async(args, report, server))

    run_recorded(report, _HOME, args.json, run)


if __name__ == "__main__":
    main()
