"""Kagura on a Ray cluster: a batch spread over the workers, and a durable run a worker finishes.

``kagura.ray`` (``pip install 'kagura[ray]'``) runs agents and workflows on worker actors of a
Ray cluster, each worker one process running many runs at once:

1. The cluster: a local one, started here with ``ray.init(address="local", num_cpus=2,
   include_dashboard=False)``, or the cluster ``RAY_ADDRESS`` names (``ray start --head`` on
   one machine, ``ray start --address=HEAD:6379`` on the others: see docs/ray.md).
2. A batch: ``await kagura.ray.map(triage, tickets, concurrency=4)`` runs one agent over every
   ticket on the workers. The answer is a ``kagura.parallel.Partial``: results by input
   position, and each failed item's error apart, without losing the other results.
3. A durable run: ``kagura.ray.submit(brief, topic, run_id=RUN_ID)`` runs the workflow on a
   worker as a durable run (its steps journaled in the shared store); ``await handle`` gives
   its result. Were the worker's process killed, Ray would start it again and the run would
   resume from its journal.
4. Once per run id: submitting ``RUN_ID`` again returns the stored result; nothing runs again.

Run it (no API key needed: agents that name no model run on the embedded SmolLM2-135M model,
loaded in each worker):

    python examples/advanced_workflows/ray_workflow.py
"""

import asyncio
import os
import socket
import time
from typing import Literal

import ray

import kagura
import kagura.ray
from kagura import agent, workflow
from kagura.durable import journal_for
from kagura.providers import resolve_model

TICKETS = [
    "I was charged twice for my subscription this month.",
    "The export button does nothing when I click it.",
    "How do I add a second user to my account?",
    "The app crashes when I upload a photo.",
    "Can I get an invoice with my company's address?",
    "Where do I change my password?",
]
TOPIC = "tide pools"
RUN_ID = "ray-example-brief"  # a fixed run id: the run happens once, whoever submits it


def short(text: object, limit: int = 70) -> str:
    """One line, at most ``limit`` characters: small models can ramble."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def header(title: str) -> None:
    print(f"\n=== {title} ===")


# ---------------------------------------------------------------------------------------------
# The agents and the workflow: plain Kagura, nothing Ray-specific
# ---------------------------------------------------------------------------------------------


@agent(max_tokens=16, temperature=0)
async def triage(ticket: str) -> Literal["billing", "bug", "question"]:
    """Is this support ticket about billing, a bug, or a question? Ticket: {{ ticket }}"""


@agent(max_tokens=48)
async def research(topic: str) -> str:
    """List two short facts about {{ topic }}."""


@agent(max_tokens=24)
async def headline(topic: str, facts: str) -> str:
    """Write a headline for a note on {{ topic }}. Facts: {{ facts }}"""


def where() -> str:
    """Which process ran the run: a ``kagura.step``, so it is journaled like an agent call."""
    return f"{socket.gethostname()} pid {os.getpid()}"


@workflow(durable=True)
async def brief(topic: str) -> dict[str, str]:
    facts = await research(topic)
    title = await headline(topic, facts)
    ran_on = await kagura.step("where", where)
    return {"headline": title, "facts": facts, "ran_on": ran_on}


# ---------------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------------


def start_ray() -> None:
    """Join the cluster ``RAY_ADDRESS`` names, else start a local one with 2 CPUs."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        print(f"Joined the Ray cluster at {os.environ['RAY_ADDRESS']}")
    else:
        # address="local": a new cluster of this process, never one this machine already runs.
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        print("Started a local Ray cluster (2 CPUs, no dashboard)")


async def batch() -> None:
    header("2. A batch: kagura.ray.map(triage, tickets, concurrency=4)")
    started = time.perf_counter()
    partial = await kagura.ray.map(triage, TICKETS, concurrency=4, progress=False)
    for index, ticket in enumerate(TICKETS):
        if index in partial.results:
            print(f"  {partial.results[index]:<9} {short(ticket, 60)}")
        else:
            print(f"  FAILED    {short(ticket, 60)}: {partial.errors[index]!r}")
    print(
        f"  {len(partial.results)} answered, {len(partial.errors)} failed, in input order "
        f"({time.perf_counter() - started:.1f} s)"
    )


async def durable_run() -> None:
    header(f"3. A durable run on a worker: kagura.ray.submit(brief, ..., run_id={RUN_ID!r})")
    journal = journal_for()
    before = await asyncio.to_thread(journal.get_run, RUN_ID)
    if before is not None and before.status == "completed":
        print("  (an earlier run of this script completed this run id: its stored result comes")
        print("  back at once; with KAGURA_HOME set to a new directory it runs again)")
    started = time.perf_counter()
    handle = kagura.ray.submit(brief, TOPIC, run_id=RUN_ID)
    result = await handle
    print(f"  run id:   {handle.run_id}")
    print(f"  headline: {short(result['headline'])}")
    print(f"  facts:    {short(result['facts'])}")
    print(f"  ran on:   {result['ran_on']} (a worker, not this process: pid {os.getpid()})")
    print(f"  took {time.perf_counter() - started:.1f} s")
    first = await asyncio.to_thread(journal.get_run, RUN_ID)
    assert first is not None
    print(f"  journal: {first.status}, {first.steps} steps, attempt {first.attempts}")

    header("4. The same run id again: the stored result, nothing runs")
    started = time.perf_counter()
    again = await kagura.ray.submit(brief, TOPIC, run_id=RUN_ID)
    took = time.perf_counter() - started
    second = await asyncio.to_thread(journal.get_run, RUN_ID)
    assert second is not None
    rerun = (second.attempts, second.steps) != (first.attempts, first.steps)
    print(f"  same result: {again == result}; ran again: {rerun} ({took:.2f} s)")
    print(f"  journal: {second.status}, {second.steps} steps, attempt {second.attempts}")


async def main() -> None:
    header("1. The cluster")
    start_ray()
    resources = ray.cluster_resources()
    print(f"  {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs")
    print(f"  Agents that name no model run on: {resolve_model(None).id}")
    print(f"  Journal and recordings: {journal_for().url}")
    try:
        await batch()
        await durable_run()
    finally:
        kagura.ray.shutdown()  # stop the workers (a cluster of your own keeps running)
        ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
