"""Circuit breaker fail-fast cost, and what a closed breaker and a rate limiter add to an agent call
(not a test: it prints figures; see benchmarks/README.md).

Every case is timed in batches; the batches of all cases are interleaved over ``--rounds`` rounds
(in a rotating order, so drift and noise spread evenly) and each figure is the median per-call
time over the rounds. Ratios are against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_breaker.py [--rounds 15] [--batch-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from kagura import Agent, agent
from kagura._instrument import sinks
from kagura.errors import ProviderError
from kagura.resilience import CircuitBreaker, CircuitOpenError, RateLimiter
from kagura.testing import FakeModel

Op = Callable[[int], Awaitable[None]]  # runs the measured operation n times

BASELINE = "await asyncio.sleep(0)"
AGENT_BASELINE = "agent call, no policies"


@dataclass(slots=True)
class Case:
    name: str
    op: Op
    agent_path: bool = False  # also compared with the agent-without-policies baseline
    iterations: int = 0
    per_call_ns: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.per_call_ns) / 1000

    @property
    def min_us(self) -> float:
        return min(self.per_call_ns) / 1000

    @property
    def max_us(self) -> float:
        return max(self.per_call_ns) / 1000


def make_agent(model: FakeModel, **policies: Any) -> Agent[[str], str]:
    async def ask(question: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
        """Answer in one word: {{ question }}"""

    return agent(model=model, retry=False, **policies)(ask)


def build_cases() -> list[Case]:
    fake = FakeModel(record_requests=False)  # answers at once with an echo of the prompt
    untouched = FakeModel()  # behind the open breaker: must never see a request

    closed = CircuitBreaker("bench-closed")
    open_ = CircuitBreaker("bench-open", failure_threshold=1, recovery_time=1e9)
    open_.record_failure(ProviderError("down", status_code=503))
    assert open_.state == "open"
    limiter = RateLimiter("bench-fast", requests_per_second=1e9)  # never makes anyone wait

    ask_plain = make_agent(fake, breaker=None, rate_limit=None)
    ask_closed = make_agent(fake, breaker=closed, rate_limit=None)
    ask_open = make_agent(untouched, breaker=open_, rate_limit=None)
    ask_limited = make_agent(fake, breaker=None, rate_limit=limiter)
    ask_both = make_agent(fake, breaker=closed, rate_limit=limiter)

    async def sleep0(n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    async def before_call_closed(n: int) -> None:
        for _ in range(n):
            closed.before_call()

    async def before_call_open(n: int) -> None:
        refused = 0
        for _ in range(n):
            try:
                open_.before_call()
            except CircuitOpenError:
                refused += 1
        assert refused == n

    bare_limiter = RateLimiter("bench-bare", requests_per_second=1e9)

    async def acquire_settle(n: int) -> None:
        for _ in range(n):
            (await bare_limiter.acquire(10)).settle(10)

    def agent_op(fn: Agent[[str], str]) -> Op:
        async def run(n: int) -> None:
            for _ in range(n):
                await fn("ping")

        return run

    async def agent_open(n: int) -> None:
        refused = 0
        for _ in range(n):
            try:
                await ask_open("ping")
            except CircuitOpenError:
                refused += 1
        assert refused == n
        assert not untouched.requests, "the open breaker let a call reach the provider"

    return [
        Case(BASELINE, sleep0),
        Case("breaker.before_call(), closed", before_call_closed),
        Case("breaker.before_call(), open (raise + catch)", before_call_open),
        Case("limiter.acquire() + settle(), 1e9 req/s", acquire_settle),
        Case("agent call, breaker open (CircuitOpenError)", agent_open, agent_path=True),
        Case(AGENT_BASELINE, agent_op(ask_plain), agent_path=True),
        Case("agent call, closed breaker", agent_op(ask_closed), agent_path=True),
        Case("agent call, rate limiter (1e9 req/s)", agent_op(ask_limited), agent_path=True),
        Case("agent call, closed breaker + rate limiter", agent_op(ask_both), agent_path=True),
    ]


async def timed(case: Case, n: int) -> float:
    """Nanoseconds per call for one batch of ``n`` calls."""
    gc.collect()
    start = time.perf_counter_ns()
    await case.op(n)
    return (time.perf_counter_ns() - start) / n


async def calibrate(case: Case, batch_seconds: float) -> None:
    """Find the iteration count that makes one batch last about ``batch_seconds``."""
    await case.op(10)  # warm up (and run the sanity checks once)
    n = 16
    while True:
        per_call = await timed(case, n)
        if per_call * n >= batch_seconds * 1e9 / 5:
            break
        n *= 4
    case.iterations = max(1, round(batch_seconds * 1e9 / per_call))


async def measure(cases: list[Case], rounds: int, batch_seconds: float, console: Console) -> None:
    for case in cases:
        await calibrate(case, batch_seconds)
    for r in range(rounds):
        console.print(f"round {r + 1}/{rounds} ...", style="dim")
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            case.per_call_ns.append(await timed(case, case.iterations))


def render(cases: list[Case], console: Console, rounds: int) -> None:
    by_name = {c.name: c for c in cases}
    base = by_name[BASELINE].median_us
    agent_base = by_name[AGENT_BASELINE].median_us
    table = Table(
        title=f"Per-call cost over {rounds} interleaved rounds (median, best and worst round)",
        title_justify="left",
    )
    table.add_column("case")
    table.add_column("calls/batch", justify="right")
    table.add_column("µs/call median", justify="right")
    table.add_column("best", justify="right")
    table.add_column("worst", justify="right")
    table.add_column("× sleep(0) median | best", justify="right")
    table.add_column("× agent, no policies median | best", justify="right")
    best = by_name[BASELINE].min_us
    agent_best = by_name[AGENT_BASELINE].min_us
    for c in cases:
        table.add_row(
            c.name,
            f"{c.iterations:,}",
            f"{c.median_us:.3f}",
            f"{c.min_us:.3f}",
            f"{c.max_us:.3f}",
            f"{c.median_us / base:.2f} | {c.min_us / best:.2f}",
            f"{c.median_us / agent_base:.3f} | {c.min_us / agent_best:.3f}" if c.agent_path else "",
        )
    console.print(table)

    def us(name: str) -> float:
        return by_name[name].median_us

    opened = us("agent call, breaker open (CircuitOpenError)")
    closed = us("agent call, closed breaker")
    both = us("agent call, closed breaker + rate limiter")
    console.print(
        f"Fail-fast: an agent call refused by an open breaker costs {opened:.1f} µs, "
        f"{opened / closed:.2f}× a successful call through the closed breaker to a zero-latency "
        f"model ({closed:.1f} µs) and {opened / us(BASELINE):.1f}× an asyncio.sleep(0); the "
        f"refusal itself (bare before_call, raise + catch) is "
        f"{us('breaker.before_call(), open (raise + catch)'):.2f} µs."
    )
    console.print(
        f"Policies on the success path: closed breaker {closed - agent_base:+.2f} µs/call, "
        f"rate limiter {us('agent call, rate limiter (1e9 req/s)') - agent_base:+.2f} µs/call, "
        f"both {both - agent_base:+.2f} µs/call ({(both / agent_base - 1) * 100:+.1f}%) over "
        f"{agent_base:.1f} µs with no policies."
    )


async def main_async(args: argparse.Namespace, console: Console) -> None:
    cases = build_cases()
    await measure(cases, args.rounds, args.batch_ms / 1000, console)
    assert not sinks(), f"instrumentation sinks were installed during the run: {sinks()}"

    render(cases, console, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    parser.add_argument("--batch-ms", type=float, default=100.0, help="length of one batch")
    args = parser.parse_args()
    # Measure the resilience layer, not the event recorder: with recording on, every call would
    # also be queued for (and written to) the default event store in KAGURA_HOME.
    os.environ["KAGURA_RECORD"] = "0"
    console = Console(width=None if sys.stdout.isatty() else 160)
    asyncio.run(main_async(args, console))


if __name__ == "__main__":
    main()
