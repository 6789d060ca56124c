"""Durable workflow runs: a run killed half-way is resumed without repeating its finished steps.

``@workflow(durable=True)`` journals every completed agent call, tool call and ``kagura.step`` of a
run in the event store. This script shows what that buys when the process running it dies:

1. A child process (this script re-run with ``--child``) starts a durable run of ``write_report``:
   research -> outline -> three sections in parallel -> summary -> publish (a ``kagura.step``
   side effect: it appends the report to an outbox file).
2. This process watches the journal and, once research and outline are journaled, kills the child
   with SIGKILL: no cleanup, no ``finally``, like an OOM kill.
3. The run is listed as ``interrupted`` at once (``kagura runs list --status interrupted``): its
   process is gone, and this is the host it ran on. (A run of another host is interrupted once
   its lease runs out: ``KAGURA_LEASE_SECONDS``, 30 s by default.)
4. ``await write_report.resume(run_id)`` finishes it in this process: research and outline come
   from the journal (no model call), the sections, summary and publish run. Each step's result
   was journaled before the workflow saw it, so nothing the child saw is run again.
5. Running the same run id again returns the recorded result; ``kagura.testing.replay`` runs the
   workflow against its journal alone; the outbox got exactly one entry.
6. ``kagura runs show`` prints the run and its journaled steps.

A service would call ``kagura.durable.recover()`` (or run ``kagura runs recover``) when it
starts, to resume every run its host was executing when it died.

Run it (no API key needed: agents that name no model run on the embedded SmolLM2-135M model):

    python examples/advanced_workflows/durable_workflow.py
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kagura
from kagura import Agent, agent, workflow
from kagura.cli import main as kagura_cli
from kagura.durable import Journal, RunRecord, journal_for
from kagura.providers import resolve_model
from kagura.testing import replay

TOPIC = "community solar power"
SECTIONS = ("Background", "Today", "Outlook")
KILL_AFTER_STEPS = 2  # research and outline


def short(text: object, limit: int = 70) -> str:
    """One line, at most ``limit`` characters: small models can ramble."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def say(*parts: object) -> None:
    """Print at once: the child's lines and ours share one terminal, and a killed child loses
    whatever it had buffered."""
    print(*parts, flush=True)


def header(title: str) -> None:
    say(f"\n=== {title} ===")


# ---------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------


@agent(max_tokens=64)
async def research(topic: str) -> str:
    """List three short facts about {{ topic }}, one per line."""


@agent(max_tokens=40)
async def outline(topic: str, facts: str) -> str:
    """Write a one-line outline for a short report on {{ topic }}. Facts: {{ facts }}"""


@agent(max_tokens=64)
async def write_section(topic: str, plan: str, title: str) -> str:
    """Write two sentences for the "{{ title }}" section of a report on {{ topic }}.
    Outline: {{ plan }}"""


@agent(max_tokens=48)
async def summarize(topic: str, sections: str) -> str:
    """Summarise this report on {{ topic }} in one sentence: {{ sections }}"""


@dataclass
class Report:
    topic: str
    outline: str
    sections: dict[str, str]
    summary: str
    published: str


async def traced(step: Agent[..., str], *args: Any) -> str:
    """Call an agent and say whether its answer came from the journal or from the model."""
    started = time.perf_counter()
    run = await step.run(*args)
    if run.model == "journal":
        how = "from journal, no model call"
    else:
        how = f"ran: {run.model}, {time.perf_counter() - started:.1f} s"
    label = f"{step.name}({args[-1]})" if step is write_section else step.name
    say(f"  [pid {os.getpid()}] {label:<26} {how:<28} {short(run.output, 30)}")
    return run.output


def publish(outbox: str, topic: str, summary: str) -> str:
    """The side effect that must happen once: append the report to the outbox (it stands in for
    a CMS, an email or a payment). As a ``kagura.step`` it is journaled before the run goes on,
    so a resumed run does not publish again. A process killed after the write but before that
    journal entry is committed would run it again: so, as a request to a real service would, it
    carries an idempotency key, and a repeat finds its entry instead of adding a second one."""
    key = hashlib.sha256(f"{topic}\n{summary}".encode()).hexdigest()[:16]
    path = Path(outbox)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for entry, line in enumerate(lines, start=1):
        if json.loads(line).get("key") == key:
            say(f"  [pid {os.getpid()}] {'publish':<26} already there: outbox entry {entry}")
            return f"{outbox}#{entry}"
    with path.open("a", encoding="utf-8") as file:
        record = {"key": key, "topic": topic, "summary": summary, "pid": os.getpid()}
        file.write(json.dumps(record) + "\n")
    entry = outbox_entries(outbox)
    say(f"  [pid {os.getpid()}] {'publish':<26} ran: outbox entry {entry}")
    return f"{outbox}#{entry}"


@workflow(durable=True)
async def write_report(topic: str, outbox: str) -> Report:
    facts = await traced(research, topic)
    plan = await traced(outline, topic, facts)
    texts = await asyncio.gather(*(traced(write_section, topic, plan, t) for t in SECTIONS))
    summary = await traced(summarize, topic, "\n".join(texts))
    published = await kagura.step("publish", publish, outbox, topic, summary)
    return Report(topic, plan, dict(zip(SECTIONS, texts, strict=True)), summary, published)


# ---------------------------------------------------------------------------------------------
# The child: the process that gets killed
# ---------------------------------------------------------------------------------------------


async def child_main(run_id: str, outbox: str) -> None:
    await write_report.run(TOPIC, outbox, run_id=run_id)


def start_child(run_id: str, outbox: str) -> subprocess.Popen[bytes]:
    """This script again, in a new process, running the workflow under ``run_id``."""
    return subprocess.Popen([sys.executable, __file__, "--child", run_id, outbox])


# ---------------------------------------------------------------------------------------------
# The parent: watch the journal, kill, resume
# ---------------------------------------------------------------------------------------------


def wait_for_steps(
    journal: Journal,
    run_id: str,
    count: int,
    child: subprocess.Popen[bytes],
    timeout: float = 120.0,
) -> RunRecord | None:
    """Poll the journal until the run has ``count`` steps, has ended, or the child exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = journal.get_run(run_id)
        if record is not None and (record.steps >= count or record.status != "running"):
            return record
        if child.poll() is not None:
            return journal.get_run(run_id)
        time.sleep(0.02)
    raise TimeoutError(f"run {run_id} journaled fewer than {count} steps in {timeout:g} s")


def kill(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL: the process cannot catch it, clean up or mark its run as anything."""
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def journaled_names(journal: Journal, run_id: str) -> list[str]:
    """The journaled steps of a run, in the order they were journaled."""
    steps = sorted(journal.load_steps(run_id).values(), key=lambda s: s.created_at or 0.0)
    return [s.name for s in steps]


def outbox_entries(outbox: str) -> int:
    path = Path(outbox)
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


async def finish(run_id: str, outbox: str) -> Report:
    """Resume the run here, then show that it is done once and for all."""
    header("4. Resume in this process: write_report.resume(run_id)")
    report = await write_report.resume(run_id)
    say("  Final result:")
    say(f"    outline:   {short(report.outline)}")
    for title, text in report.sections.items():
        say(f"    {title + ':':<11}{short(text)}")
    say(f"    summary:   {short(report.summary)}")
    say(f"    published: {report.published}")

    header("5. Once and only once")
    again = await write_report.run(TOPIC, outbox, run_id=run_id)
    say(
        f"  write_report.run(..., run_id={run_id!r}) again: same result, nothing ran: "
        f"{again == report}"
    )
    say("  kagura.testing.replay(run_id): the workflow against its journal alone (no model,")
    say("  no writes), e.g. to check that changed code still follows a recorded run:")
    replayed = await replay(run_id)
    say(f"  -> same result: {replayed == report}")
    say(f"  outbox entries for this run: {outbox_entries(outbox)} (published exactly once)")
    return report


def main() -> None:
    started = time.perf_counter()
    run_id = f"report-{uuid.uuid4().hex[:8]}"
    outbox = str(Path(tempfile.mkdtemp(prefix="kagura-outbox-")) / "outbox.jsonl")
    journal = journal_for()
    say(f"Agents that name no model run on: {resolve_model(None).id}")
    say(f"Journal: the event store {journal.url}")

    header(f"1. A child process starts durable run {run_id}")
    child = start_child(run_id, outbox)
    say(f"  child pid {child.pid}: python {Path(__file__).name} --child {run_id} ...")
    record = wait_for_steps(journal, run_id, KILL_AFTER_STEPS, child)

    header("2. Kill the child with SIGKILL")
    killed = False
    if record is not None and record.status == "running" and child.poll() is None:
        kill(child)
        # Read again: the child may have finished the run between that read and the kill.
        record = journal.get_run(run_id)
        killed = record is not None and record.status != "completed"
    if killed and record is not None:
        say(f"  killed pid {child.pid} with {record.steps} steps journaled")
    else:
        child.wait(timeout=60)
        status = record.status if record is not None else "unknown"
        say(f"  the child finished the run first (status {status}): with a model this fast the")
        say("  run is done before it can be killed, and the resume below just returns it")
    say(f"  journaled so far: {', '.join(journaled_names(journal, run_id)) or 'nothing'}")

    header("3. The run is interrupted at once")
    record = journal.get_run(run_id)
    if record is not None and record.status in ("running", "interrupted"):
        say(f"  status right after the kill: {record.status} (its process is gone, and this is")
        say("  the host it ran on: no lease to wait for). `kagura runs list --status interrupted`:")
        sys.stdout.flush()
        kagura_cli(["runs", "list", "--status", "interrupted", "--limit", "3"])
    else:
        say(f"  nothing to resume: the run is {record.status if record else 'missing'}")

    asyncio.run(finish(run_id, outbox))

    header(f"6. `kagura runs show {run_id}`")
    sys.stdout.flush()
    kagura_cli(["runs", "show", run_id])
    say(f"\nDone in {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        asyncio.run(child_main(sys.argv[2], sys.argv[3]))
    else:
        main()
