"""Durable runs on a local Ray cluster (kagura.ray) against the same runs in one process.

1. Runs per second: ``--runs`` durable runs at once of a workflow of two agent calls, one after
   the other, on a provider answering in 100 ms (the fake model with a delay), through
   ``kagura.ray.submit`` with 1 and then 2 worker actors, against ``asyncio.gather`` of
   ``workflow.run(..., run_id=...)`` in this process; the two alternate round by round (the order
   flips every round), so each ratio is against rounds measured next to it.
2. What ``submit`` costs a run: the driver's time in ``kagura.ray.submit(...)`` (checking the
   arguments, handing the task to Ray), and the round trip of a run on the zero-latency fake
   model through a worker, one at a time, against ``workflow.run`` in this process.

Ray is started here (``ray.init``, 2 CPUs by default, no dashboard) and only inside a private
network namespace whose one interface is loopback: run elsewhere, the script runs itself again
in one (``kagura.testing.in_private_network``: Linux's ``unshare`` and ``ip``). Every process
journals to one fresh SQLite file (one host). Recording is off unless ``--record``.

Run: .venv/bin/python benchmarks/bench_ray.py [--runs N] [--rounds K] [--serial N] [--json F]
"""

from __future__ import annotations

import os
import socket
import sys


def _in_private_network() -> bool:
    return {name for _, name in socket.if_nameindex()} == {"lo"}


if __name__ == "__main__" and not _in_private_network():
    # Before anything else (no temporary store made here): this process becomes the one that
    # runs in the namespace.
    import shutil

    from kagura.testing import in_private_network

    if shutil.which("unshare") is None or shutil.which("ip") is None:
        sys.exit("bench_ray.py starts Ray in a private network namespace: unshare and ip needed")
    command = in_private_network([sys.executable, __file__, *sys.argv[1:]])
    os.execvp(command[0], command)

import tempfile  # noqa: E402

# Settings are read when kagura first needs them: set them before anything runs. The workers
# of a local cluster inherit this environment (and take KAGURA_HOME and KAGURA_RECORD from
# the driver anyway). The store is KAGURA_HOME/events.db.
_HOME = tempfile.mkdtemp(prefix="kagura-bench-ray-")
os.environ["KAGURA_HOME"] = _HOME
os.environ["KAGURA_RECORD"] = "1" if "--record" in sys.argv else "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
for _name in (
    "KAGURA_DB",
    "KAGURA_DURABLE",
    "KAGURA_MODEL_OVERRIDE",
    "KAGURA_LEASE_SECONDS",
    "RAY_ADDRESS",
):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from _bench import Report, fmt, ratio, run_recorded  # noqa: E402

import kagura.ray  # noqa: E402
from kagura import Workflow, agent, workflow  # noqa: E402
from kagura.providers.fake import FakeModel  # noqa: E402
from kagura.ray import _cluster  # noqa: E402

# A provider answering in 100 ms. The instance goes to the workers with the agents (pickled),
# each worker getting its own copy; it keeps no request history.
SLOW = FakeModel(delay=0.1, record_requests=False)


@agent(model=SLOW)
async def draft(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """Draft: {{ text }}"""


@agent(model=SLOW)
async def polish(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """Polish: {{ text }}"""


@workflow(durable=True)
async def two_calls(text: str) -> str:
    return await polish(await draft(text))


@agent(model="fake")  # answers at once
async def draft_now(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """Draft: {{ text }}"""


@agent(model="fake")
async def polish_now(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """Polish: {{ text }}"""


@workflow(durable=True)
async def two_calls_now(text: str) -> str:
    return await polish_now(await draft_now(text))


async def await_handle(handle: kagura.ray.RunHandle[Any]) -> Any:
    return await handle


def new_id() -> str:
    return uuid.uuid4().hex


async def in_process(flow: Workflow[[str], str], runs: int) -> float:
    """Seconds for ``runs`` durable runs at once in this process."""
    started = time.perf_counter()
    results = await asyncio.gather(*(flow.run("x", run_id=new_id()) for _ in range(runs)))
    elapsed = time.perf_counter() - started
    assert all(r == results[0] for r in results), results[:2]
    return elapsed


async def on_ray(flow: Workflow[[str], str], runs: int) -> float:
    """Seconds for ``runs`` durable runs at once through ``kagura.ray.submit``, from the first
    submission to the last result."""
    started = time.perf_counter()
    handles = [kagura.ray.submit(flow, "x", run_id=new_id()) for _ in range(runs)]
    results = await asyncio.gather(*handles)
    elapsed = time.perf_counter() - started
    assert all(r == results[0] for r in results), results[:2]
    return elapsed


async def throughput(workers: int, runs: int, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per round in this process and on ``workers`` workers, alternated round by round
    (after one untimed round of each)."""
    kagura.ray.configure(workers=workers)
    # The first submission starts the workers (and waits for them): not on the event loop.
    await await_handle(await asyncio.to_thread(kagura.ray.submit, two_calls, "warm-up"))
    await in_process(two_calls, runs)
    await on_ray(two_calls, runs)
    local: list[float] = []
    remote: list[float] = []
    for number in range(rounds):
        pair: list[tuple[list[float], Callable[[Workflow[[str], str], int], Awaitable[float]]]]
        pair = [(local, in_process), (remote, on_ray)]
        for results, how in pair if number % 2 == 0 else reversed(pair):
            results.append(await how(two_calls, runs))
    return local, remote


async def submit_cost(runs: int, rounds: int) -> float:
    """Median µs of the driver's time in ``kagura.ray.submit`` per run (the runs then finish,
    untimed, before the next round)."""
    per_call: list[float] = []
    for _ in range(rounds):
        ids = [new_id() for _ in range(runs)]
        started = time.perf_counter()
        handles = [kagura.ray.submit(two_calls_now, "x", run_id=i) for i in ids]
        per_call.append((time.perf_counter() - started) / runs * 1e6)
        await asyncio.gather(*handles)
    return statistics.median(per_call)


async def round_trip(serial: int, rounds: int) -> tuple[float, float, float]:
    """Median ms per run of zero-latency runs one at a time: through a worker, and in this
    process, alternated round by round; and Ray's own round trip to the same worker (a call of
    its no-op method)."""
    worker = _cluster.pool().workers[0]

    async def ray_ms() -> float:
        started = time.perf_counter()
        for _ in range(serial):
            await worker.ready.remote()
        return (time.perf_counter() - started) / serial * 1e3

    async def remote_ms() -> float:
        started = time.perf_counter()
        for _ in range(serial):
            await kagura.ray.submit(two_calls_now, "x", run_id=new_id())
        return (time.perf_counter() - started) / serial * 1e3

    async def local_ms() -> float:
        started = time.perf_counter()
        for _ in range(serial):
            await two_calls_now.run("x", run_id=new_id())
        return (time.perf_counter() - started) / serial * 1e3

    await remote_ms()
    await local_ms()
    await ray_ms()
    remote: list[float] = []
    local: list[float] = []
    floor: list[float] = []
    for number in range(rounds):
        turns: list[tuple[list[float], Callable[[], Awaitable[float]]]]
        turns = [(local, local_ms), (remote, remote_ms), (floor, ray_ms)]
        for results, how in turns if number % 2 == 0 else reversed(turns):
            results.append(await how())
    return statistics.median(remote), statistics.median(local), statistics.median(floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="runs at once (default 400)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--serial", type=int, default=100, help="runs one at a time per round (default 100)"
    )
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    parser.add_argument("--record", action="store_true", help="record spans too (default off)")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()
    report = Report(
        "ray",
        "kagura.ray: durable runs on a local Ray cluster against one process",
        "benchmarks/bench_ray.py",
        "A durable workflow of two agent calls, one after the other, submitted with "
        "kagura.ray.submit to worker actors of a local Ray cluster (started by the benchmark in a "
        "private network namespace), against asyncio.gather of workflow.run(..., run_id=...) in "
        "the driver's process, alternated round by round. Every process journals to one SQLite "
        "file.",
        {
            "runs": args.runs,
            "rounds": args.rounds,
            "serial": args.serial,
            "cpus": args.cpus,
            "recording": "on" if args.record else "off",
        },
    )

    def run() -> None:
        # address="local": a new cluster, never the one /tmp/ray/ray_current_cluster names (a
        # cluster of another namespace, which ray.init() would otherwise try to join).
        ray.init(
            address="local",
            num_cpus=args.cpus,
            include_dashboard=False,
            namespace="kagura",
            log_to_driver=False,
        )
        try:
            measure()
        finally:
            kagura.ray.shutdown()
            ray.shutdown()

    def measure() -> None:
        table = report.table(
            f"Runs per second: {args.runs} runs at once, two agent calls each on a provider "
            f"answering in 100 ms (median of {args.rounds} rounds)",
            ["", "runs/s", "one process, same rounds", "× one process", "rounds (s)"],
        )
        for workers in (1, 2):
            local, remote = asyncio.run(throughput(workers, args.runs, args.rounds))
            seconds, base = statistics.median(remote), statistics.median(local)
            table.add(
                f"kagura.ray, {workers} worker{'s' if workers > 1 else ''}",
                fmt(args.runs / seconds, 0),
                fmt(args.runs / base, 0),
                ratio(base, seconds),
                " ".join(f"{s:.2f}" for s in remote),
            )
        table.notes.append(
            "One process: asyncio.gather of workflow.run(..., run_id=...) in the driver, in the "
            "rounds alternated with those of the same line. A run takes at least 0.2 s (two calls "
            f"of 100 ms): {args.runs} runs at once would be {args.runs / 0.2:,.0f} runs/s at that "
            "floor."
        )

        cost_us = asyncio.run(submit_cost(args.runs, args.rounds))
        remote_ms, local_ms, floor_ms = asyncio.run(round_trip(args.serial, args.rounds))
        table = report.table(
            f"What submit costs a run (zero-latency fake model, 2 workers; median of "
            f"{args.rounds} rounds)",
            ["", "per run", "× in process"],
        )
        table.add(
            f"driver's time in kagura.ray.submit(...) ({args.runs} in a row)",
            f"{cost_us:.0f} µs",
            "",
        )
        table.add(
            f"workflow.run in this process, one at a time ({args.serial} runs)",
            f"{local_ms:.2f} ms",
            "1.00×",
        )
        table.add(
            f"await kagura.ray.submit(...), one at a time ({args.serial} runs)",
            f"{remote_ms:.2f} ms",
            ratio(remote_ms, local_ms),
        )
        table.add(
            f"Ray alone: await worker.ready.remote(), a no-op method ({args.serial} calls)",
            f"{floor_ms:.2f} ms",
            ratio(floor_ms, local_ms),
        )
        table.notes.append(
            f"A run through a worker costs {remote_ms - local_ms:.2f} ms more than in process, of "
            f"which {floor_ms:.2f} ms is Ray's round trip to the worker; the rest is the worker's "
            "side around the same durable run (the task's arguments unpickled, the store's "
            "session, the spans flushed before the result returns; see benchmarks/README.md)."
        )

    run_recorded(report, _HOME, args.json, run)


if __name__ == "__main__":
    main()
