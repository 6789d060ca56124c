"""Embedded model on Ray: ``kagura.ray.map`` throughput with 1 and 2 model actors, against the
same batch in one process without Ray (not a test: it prints figures).

One agent on ``local/smollm2`` (greedy, small ``max_tokens``) over ``--items`` short prompts
(default 24). In one process: ``kagura.parallel.map``, the embedded model's default worker
threads. On Ray: a local cluster of this machine's cores, the default workers, and
``kagura.ray.configure(model_actors=n)`` with 1 CPU (one llama.cpp thread) per actor. Every
setup gets an untimed batch first (the model loaded, the actors and workers started), then
``--reps`` timed batches (default 3); items per second is items / wall time of the batch.

Ray binds to the machine's network address, so the script runs itself in a private network
namespace whose only interface is ``lo`` (``kagura.testing.in_private_network``).

    .venv/bin/python benchmarks/bench_ray_models.py [--items 24] [--reps 3] [--max-tokens 16]
"""

from __future__ import annotations

import os
import socket
import sys


def _in_private_network() -> bool:
    return {name for _, name in socket.if_nameindex()} == {"lo"}


if __name__ == "__main__" and not _in_private_network():
    from kagura.testing import in_private_network

    _command = in_private_network([sys.executable, __file__, *sys.argv[1:]])
    os.execvp(_command[0], _command)

import tempfile  # noqa: E402

_HOME = tempfile.mkdtemp(prefix="kagura-bench-ray-models-")
os.environ["KAGURA_HOME"] = _HOME  # recording on (the normal configuration) writes here
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
for _name in ("KAGURA_DB", "KAGURA_RECORD", "KAGURA_MODEL_OVERRIDE", "KAGURA_LOCAL_WORKERS"):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402

from _bench import Report, console, fmt, median, ratio, run_recorded  # noqa: E402

import kagura.parallel  # noqa: E402
import kagura.ray  # noqa: E402
from kagura import Agent, agent  # noqa: E402

TOPICS = (
    "rain", "bread", "a river", "the moon", "a violin", "winter", "a lighthouse", "tea",
    "a fox", "the sea", "a clock", "autumn", "a bridge", "snow", "a garden", "thunder",
    "a library", "sand", "a kite", "the desert", "a candle", "spring", "a train", "honey",
)  # fmt: skip


def make_agent(max_tokens: int) -> Agent[[str], str]:
    async def describe(topic: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
        """Describe {{ topic }} in one short sentence."""

    return agent(model="local/smollm2", temperature=0, max_tokens=max_tokens)(describe)


def prompts(count: int) -> list[str]:
    return [TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" ({i})") for i in range(count)]


async def timed(batch: Callable[[], Awaitable[int]], items: int) -> float:
    """Items per second of one batch (all of which must succeed)."""
    start = time.perf_counter()
    done = await batch()
    elapsed = time.perf_counter() - start
    if done != items:
        raise RuntimeError(f"{items - done} of {items} items failed")
    return items / elapsed


async def measure(args: argparse.Namespace, report: Report) -> None:
    import ray

    say = console()
    describe = make_agent(args.max_tokens)
    items = prompts(args.items)
    rates: dict[str, list[float]] = {}

    async def in_process() -> int:
        results = await kagura.parallel.map(describe, items, concurrency=len(items), progress=False)
        return len(results)

    async def on_ray() -> int:
        done = await kagura.ray.map(describe, items, concurrency=len(items), progress=False)
        return len(done.results)

    one_process = "one process, kagura.parallel.map"
    say.print(f"{one_process}: loading the model (one untimed batch) ...", style="dim")
    await in_process()
    rates[one_process] = [await timed(in_process, len(items)) for _ in range(args.reps)]

    cpus = os.cpu_count() or 1
    # address="local": a cluster of this process's own, never one another program started.
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        namespace="kagura",
        log_to_driver=False,
    )
    try:
        for actors in (1, 2):
            name = f"kagura.ray.map, {actors} model actor{'s' if actors > 1 else ''}"
            kagura.ray.configure(model_actors=actors, model_cpus=1.0)
            say.print(
                f"{name}: starting the workers and actors (one untimed batch) ...", style="dim"
            )
            await on_ray()
            rates[name] = []
            for r in range(args.reps):
                say.print(f"{name}: batch {r + 1}/{args.reps}", style="dim")
                rates[name].append(await timed(on_ray, len(items)))
            kagura.ray.shutdown()
    finally:
        kagura.ray.shutdown()
        ray.shutdown()

    report.params.update(cores=cpus, model_cpus=1.0, workers=f"default ({cpus})")
    table = report.table(
        f"Items per second, {len(items)} prompts, max_tokens={args.max_tokens}, greedy "
        f"(median of {args.reps} batches)",
        ["setup", "items/s", "best | worst", "s per batch", "× one process"],
    )
    base = median(rates[one_process])
    for name, values in rates.items():
        table.add(
            name,
            fmt(median(values), 2),
            f"{max(values):.2f} | {min(values):.2f}",
            fmt(len(items) / median(values), 2),
            ratio(median(values), base),
        )
    table.notes.append(
        "One process: the embedded model's default worker threads (one llama.cpp instance per "
        "thread, the cores shared between them). On Ray: each model actor is a process with "
        "one llama.cpp instance and num_cpus=1 (one thread, for the prompt as for the "
        "generation); the workers call them, taking no CPU of their own in Ray's accounting."
    )
    one = median(rates["kagura.ray.map, 1 model actor"])
    two = median(rates["kagura.ray.map, 2 model actors"])
    report.line(
        f"2 model actors / 1 model actor, measured in this run: {two / one:.2f}× "
        f"({fmt(two, 2)} against {fmt(one, 2)} items/s on {cpus} cores)"
    )
    report.line(
        f"2 model actors against one process without Ray: {two / base:.2f}× "
        f"({fmt(two, 2)} against {fmt(base, 2)} items/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=24, help="prompts in the batch")
    parser.add_argument("--reps", type=int, default=3, help="timed batches per setup")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every call")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()
    report = Report(
        name="ray_models",
        title="Embedded model on Ray: map throughput by model actors",
        command="python benchmarks/bench_ray_models.py",
        description=(
            "One `local/smollm2` agent (greedy, small `max_tokens`) over a batch of short "
            "prompts: `kagura.ray.map` on a local Ray cluster of this machine's cores with 1 "
            "and 2 model actors (1 CPU, one llama.cpp thread each), against "
            "`kagura.parallel.map` in one process without Ray. Run in a private network "
            "namespace."
        ),
        params={"items": args.items, "reps": args.reps, "max_tokens": args.max_tokens},
    )
    run_recorded(report, _HOME, args.json, lambda: asyncio.run(measure(args, report)))


if __name__ == "__main__":
    main()
