"""Import time: ``import kagura`` against ``import langgraph`` and LlamaIndex Workflows (not a
test: it prints figures).

Each snippet runs in a fresh interpreter (``python -c``), ``--reps`` times (default 20), the
snippets taking turns; the figure is the median wall time of the process minus that of
``python -c pass``. One untimed run of each first, so every bytecode cache is written (with
``PYTHONDONTWRITEBYTECODE`` removed from the snippets' environment: pip wrote the installed
packages' caches, and an installed Kagura has its own). A second table times "import, build and
run once" of each framework: Kagura defers its heavier imports (the openai SDK, SQLAlchemy) to
first use, so import time alone flatters it.

    .venv/bin/python benchmarks/bench_import.py [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _bench import Report, ServerProcess, console, fmt, median

BASELINE = "python -c pass"

IMPORTS: dict[str, str] = {
    BASELINE: "pass",
    "import kagura": "import kagura",
    "import langgraph": "import langgraph",
    "from langgraph.graph import StateGraph": "from langgraph.graph import StateGraph",
    "from workflows import Workflow (LlamaIndex)": "from workflows import Workflow",
    "import openai (the SDK a user of OpenAI would import)": "import openai",
    "import aiohttp (what Kagura loads on the first OpenAI call)": "import aiohttp",
}

KAGURA_FIRST_RUN = '''
import asyncio
from kagura import agent

@agent(model="fake")
async def summarise(text: str) -> str:
    """Summarise: {{ text }}"""

assert asyncio.run(summarise("x")) == "Summarise: x"
'''

LANGGRAPH_FIRST_RUN = """
import asyncio
from typing import TypedDict
from langgraph.graph import END, START, StateGraph

class State(TypedDict):
    text: str

async def summarise(state: State) -> dict:
    return {"text": "Summarise: " + state["text"]}

builder = StateGraph(State)
builder.add_node("summarise", summarise)
builder.add_edge(START, "summarise")
builder.add_edge("summarise", END)
graph = builder.compile()
assert asyncio.run(graph.ainvoke({"text": "x"}))["text"] == "Summarise: x"
"""

LLAMAINDEX_FIRST_RUN = """
import asyncio
from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent

class Summarise(Workflow):
    @step
    async def summarise(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result="Summarise: " + ev.text)

async def main() -> str:
    return await Summarise().run(text="x")

assert asyncio.run(main()) == "Summarise: x"
"""

KAGURA_FAKE_ON = "Kagura: import, one agent call on FakeModel (recording on)"
KAGURA_FAKE_OFF = "Kagura: the same with KAGURA_RECORD=0"
FIRST_RUNS: dict[str, str] = {
    BASELINE: "pass",
    KAGURA_FAKE_ON: KAGURA_FIRST_RUN,
    KAGURA_FAKE_OFF: "import os; os.environ['KAGURA_RECORD'] = '0'\n" + KAGURA_FIRST_RUN,
    "LangGraph: import, build a one-node graph, ainvoke": LANGGRAPH_FIRST_RUN,
    "LlamaIndex Workflows: import, one-step workflow, run": LLAMAINDEX_FIRST_RUN,
}

# Issue 17's cold start: a first call to an OpenAI-compatible server (the fault server, answering
# at once, in a process of its own) against importing the SDK alone.
SDK_IMPORT = "import openai"

BARE_SDK_FIRST_CALL = """
import os
from openai import OpenAI
client = OpenAI(base_url=os.environ["BENCH_BASE_URL"], api_key="bench", max_retries=0)
answer = client.chat.completions.create(
    model="fault-model", messages=[{"role": "user", "content": "x"}]
)
assert answer.choices[0].message.content == "x"
"""

KAGURA_HTTP_FIRST_CALL = '''
import asyncio, os
from kagura import agent

@agent(model="fault-model", base_url=os.environ["BENCH_BASE_URL"], api_key="bench")
async def echo(text: str) -> str:
    """{{ text }}"""

assert asyncio.run(echo("x")) == "x"
'''

KAGURA_RECORDING_ON = "Kagura: import, one agent call over HTTP (recording on, the default)"
KAGURA_RECORDING_OFF = "Kagura: import, one agent call over HTTP (KAGURA_RECORD=0)"
COLD_STARTS: dict[str, str] = {
    BASELINE: "pass",
    SDK_IMPORT: "import openai",
    "the openai SDK: import, one synchronous chat call": BARE_SDK_FIRST_CALL,
    KAGURA_RECORDING_ON: KAGURA_HTTP_FIRST_CALL,
    KAGURA_RECORDING_OFF: "import os; os.environ['KAGURA_RECORD'] = '0'\n" + KAGURA_HTTP_FIRST_CALL,
}


@dataclass
class Snippet:
    name: str
    code: str
    seconds: list[float] = field(default_factory=list)
    failed: str = ""


def run_once(code: str, env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, error text or "") of one fresh interpreter running ``code``."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        return elapsed, (done.stderr.strip().splitlines() or ["failed"])[-1]
    return elapsed, ""


def measure(snippets: list[Snippet], reps: int, env: dict[str, str]) -> None:
    for s in snippets:
        _, s.failed = run_once(s.code, env)  # warm-up: bytecode caches, disk cache
    live = [s for s in snippets if not s.failed]
    for r in range(reps):
        shift = r % len(live)
        for s in live[shift:] + live[:shift]:
            seconds, error = run_once(s.code, env)
            if error:
                s.failed = error
            s.seconds.append(seconds)


def add_table(
    report: Report, title: str, snippets: list[Snippet], reps: int, ratio: str = "× Kagura"
) -> None:
    """A table of ``snippets``, the first being the interpreter alone, the second the one the
    ``ratio`` column compares each with."""
    base = median(snippets[0].seconds)
    reference = snippets[1]
    table = report.table(
        title, ["snippet", "ms, minus interpreter start", "process ms (median)", ratio]
    )
    for s in snippets:
        if s.failed:
            table.add(s.name, "failed", s.failed[:60], "")
            continue
        own = median(s.seconds) - base
        ref = median(reference.seconds) - base
        table.add(
            s.name,
            "" if s is snippets[0] else fmt(own * 1000, 1),
            fmt(median(s.seconds) * 1000, 1),
            "" if s is snippets[0] or ref <= 0 else f"{max(own, 0.0) / ref:.2f}×",
        )
    table.notes.append(
        f"Median of {reps} fresh interpreters per snippet, snippets taking turns; the first row "
        "is the interpreter's own start-up, subtracted from the others."
    )


def cold_start(report: Report, reps: int, env: dict[str, str]) -> None:
    """The cold start of issue 17: import and a first agent call over HTTP, against importing
    the provider's SDK."""
    fanout = Path(__file__).with_name("bench_fanout.py")  # its --serve answers every request
    with ServerProcess(str(fanout), "--delay", "0") as server:
        env = {**env, "BENCH_BASE_URL": server.base_url}
        snippets = [Snippet(name, code) for name, code in COLD_STARTS.items()]
        measure(snippets, reps, env)
    add_table(
        report, "Cold start: import and a first call to an OpenAI-compatible server", snippets, reps
    )
    table = report.tables[-1]
    table.notes.append(
        "The server: kagura.testing.fault_server.FaultServer on 127.0.0.1 in a process of its "
        "own, answering at once."
    )
    base = median(snippets[0].seconds)
    sdk = median(snippets[1].seconds) - base
    for s in snippets[3:]:
        if s.failed:
            continue
        extra = median(s.seconds) - base - sdk
        report.check(
            f"{s.name} ≤ importing the openai SDK + 0.3 s",
            extra <= 0.3,
            f"{extra:+.3f} s ({(median(s.seconds) - base):.3f} s against {sdk:.3f} s)",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="interpreters per snippet")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    args = parser.parse_args()

    report = Report(
        name="import",
        title="Import time",
        command="python benchmarks/bench_import.py",
        description=(
            "Wall time of a fresh `python -c SNIPPET`, minus that of `python -c pass`. Kagura "
            "imports aiohttp and SQLAlchemy on first use, not at import, so the second "
            "table also times a first call of each framework. Every snippet runs from bytecode "
            "caches, written by an untimed run of it first, as after `pip install`."
        ),
        params={"reps": args.reps},
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kagura-bench-import-") as home:
        # PYTHONDONTWRITEBYTECODE off as well: set (as on these machines), it leaves Kagura, an
        # editable install, compiled from source in every interpreter, while the packages pip
        # installed run from the bytecode pip wrote. A user's installed Kagura has its own.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KAGURA_", "LANGSMITH_")) and k != "PYTHONDONTWRITEBYTECODE"
        }
        env["KAGURA_HOME"] = home  # the first-call snippet records here
        say = console()
        say.print("import only ...", style="dim")
        imports = [Snippet(name, code) for name, code in IMPORTS.items()]
        measure(imports, args.reps, env)
        add_table(report, "Import", imports, args.reps)
        report.tables[-1].notes.append(
            "`import langgraph` alone loads next to nothing (a bare package); building a graph "
            "needs `langgraph.graph`."
        )
        say.print("import and first run ...", style="dim")
        first = [Snippet(name, code) for name, code in FIRST_RUNS.items()]
        measure(first, args.reps, env)
        add_table(report, "Import, build and run once", first, args.reps)
        on, off = (next(s for s in first if s.name == n) for n in (KAGURA_FAKE_ON, KAGURA_FAKE_OFF))
        if not (on.failed or off.failed):
            added = median(on.seconds) - median(off.seconds)
            report.check(
                "recording adds ≤ 0.1 s to a script of one agent call (FakeModel)",
                added <= 0.1,
                f"+{added:.3f} s ({median(on.seconds):.3f} s against {median(off.seconds):.3f} s)",
            )
        say.print("cold start over HTTP ...", style="dim")
        cold_start(report, args.reps, env)
    report.seconds = time.perf_counter() - started
    report.print(console())
    report.save(args.json)


if __name__ == "__main__":
    main()
