"""Framework overhead per agent step: raw asyncio, Kagura (recording on, off, durable), LangGraph
and LlamaIndex Workflows, side by side (not a test: it prints figures; see benchmarks/README.md).

The workload of one run: three agent calls in parallel, then one agent call over their three
results (4 steps). The provider is a zero-latency fake (the awaited call returns at once), so what
is measured is the framework. ``--runs`` runs (default 2,000) are started at once with
``asyncio.gather`` and timed from the first call to the last result.

Each contender runs each round in a fresh worker process of its own, importing only itself (as a
user's program would): in one shared process, every contender's garbage collections would also
walk the objects of the frameworks imported next to it. A worker does one untimed warm-up round,
then the timed one. Contenders take turns, in a rotating order, over ``--rounds`` rounds; figures
are medians over the rounds, in µs per agent step, and ratios are against raw asyncio measured in
the same rounds.

    .venv/bin/python benchmarks/bench_overhead.py [--runs 2000] [--rounds 7] [--only kagura]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypedDict

from _bench import Report, console, fmt, median, ratio

STEPS_PER_RUN = 4
TEXT = "x"
PROMPT = "Summarise: {text}"
#: What every contender must return for ``TEXT`` (the fake provider echoes its prompt).
EXPECTED = PROMPT.format(text=PROMPT.format(text=TEXT) * 3)

RAW = "raw asyncio (the floor)"
KAGURA_ON = "Kagura, recording on"
KAGURA_OFF = "Kagura, recording off"
KAGURA_DURABLE = "Kagura, durable=True"
LANGGRAPH = "LangGraph"
LLAMAINDEX = "LlamaIndex Workflows"
CONTENDERS = (RAW, KAGURA_ON, KAGURA_OFF, KAGURA_DURABLE, LANGGRAPH, LLAMAINDEX)


async def fake_llm(prompt: str) -> str:
    """The zero-latency provider of raw asyncio, LangGraph and LlamaIndex: an echo."""
    return prompt


# -- raw asyncio -------------------------------------------------------------------------------


async def raw_run(text: str) -> str:
    a, b, c = await asyncio.gather(
        fake_llm(PROMPT.format(text=text)),
        fake_llm(PROMPT.format(text=text)),
        fake_llm(PROMPT.format(text=text)),
    )
    return await fake_llm(PROMPT.format(text=a + b + c))


# -- Kagura ------------------------------------------------------------------------------------


def build_kagura(durable: bool) -> Callable[[str], Awaitable[str]]:
    """Two agents' worth of workflow on an echo model; every other setting at its default."""
    from kagura import agent, workflow
    from kagura.providers import Model, ModelRequest, ModelResponse

    class EchoModel(Model):
        """The same echo as ``fake_llm``, behind the provider interface (a ``ModelResponse``
        with no usage). Not ``model="fake"``: ``FakeModel`` is a test double (scripts, request
        history, word-count usage), and its own work is not the framework's."""

        provider = "fake"  # a free provider: its price is looked up as for any model
        model_name = "bench-echo"

        async def request(self, request: ModelRequest) -> ModelResponse:
            return ModelResponse(request.messages[-1]["content"])

    @agent(model=EchoModel())
    async def summarise(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
        """Summarise: {{ text }}"""

    async def fan_in(text: str) -> str:
        a, b, c = await asyncio.gather(summarise(text), summarise(text), summarise(text))
        return await summarise(a + b + c)

    return workflow(name="fan_in_durable" if durable else "fan_in", durable=durable)(fan_in)


def kagura_flush() -> None:
    """Wait for the default recorder to write everything queued (timed: part of the cost)."""
    from kagura.observability._recorder import default_recorder

    recorder = default_recorder()
    if recorder is None or not recorder.flush(timeout=600):
        raise RuntimeError("the default recorder is not installed or did not flush")


# -- LangGraph ---------------------------------------------------------------------------------


class FanState(TypedDict, total=False):
    text: str
    a: str
    b: str
    c: str
    out: str


def build_langgraph() -> Callable[[str], Awaitable[str]]:
    """A StateGraph: three parallel nodes from START, joined into a fourth."""
    from langgraph.graph import END, START, StateGraph

    def branch(key: str) -> Callable[[FanState], Awaitable[dict[str, str]]]:
        async def node(state: FanState) -> dict[str, str]:
            return {key: await fake_llm(PROMPT.format(text=state["text"]))}

        return node

    async def join(state: FanState) -> dict[str, str]:
        return {"out": await fake_llm(PROMPT.format(text=state["a"] + state["b"] + state["c"]))}

    builder = StateGraph(FanState)
    for key in ("a", "b", "c"):
        builder.add_node(key, branch(key))  # type: ignore[call-overload]
        builder.add_edge(START, key)
    builder.add_node("join", join)
    builder.add_edge(["a", "b", "c"], "join")
    builder.add_edge("join", END)
    graph = builder.compile()

    async def run(text: str) -> str:
        state = await graph.ainvoke({"text": text})
        return str(state["out"])

    return run


# -- LlamaIndex Workflows ----------------------------------------------------------------------


def build_llamaindex() -> Callable[[str], Awaitable[str]]:
    """A step sending three events to a 3-worker step, joined with ``collect_events``."""
    from workflows import Context, Workflow, step
    from workflows.events import Event, StartEvent, StopEvent

    class Fan(Event):
        text: str

    class Done(Event):
        out: str

    class FanIn(Workflow):
        @step
        async def fan_out(self, ctx: Context, ev: StartEvent) -> Fan | None:
            for _ in range(3):
                ctx.send_event(Fan(text=ev.text))
            return None

        @step(num_workers=3)
        async def work(self, ev: Fan) -> Done:
            return Done(out=await fake_llm(PROMPT.format(text=ev.text)))

        @step
        async def join(self, ctx: Context, ev: Done) -> StopEvent | None:
            done = ctx.collect_events(ev, [Done] * 3)
            if done is None:
                return None
            text = "".join(e.out for e in done)
            return StopEvent(result=await fake_llm(PROMPT.format(text=text)))

    flow = FanIn(timeout=None)  # the default 45 s would cut off a large concurrent batch

    async def run(text: str) -> str:
        return str(await flow.run(text=text))

    return run


# -- one worker process per contender and round ----------------------------------------------


def build(name: str) -> tuple[Callable[[str], Awaitable[str]], Callable[[], None] | None]:
    """The contender's run, and what to call (timed) once every run has returned."""
    if name == RAW:
        return raw_run, None
    if name in (KAGURA_ON, KAGURA_OFF, KAGURA_DURABLE):
        return build_kagura(name == KAGURA_DURABLE), None if name == KAGURA_OFF else kagura_flush
    if name == LANGGRAPH:
        return build_langgraph(), None
    if name == LLAMAINDEX:
        return build_llamaindex(), None
    raise ValueError(f"no contender named {name!r}")


async def timed_round(
    run: Callable[[str], Awaitable[str]], settle: Callable[[], None] | None, runs: int
) -> tuple[float, float]:
    """(µs per step with ``settle``, µs per step until the last result) for one round."""
    gc.collect()
    start = time.perf_counter()
    results = await asyncio.gather(*(run(TEXT) for _ in range(runs)))
    returned = time.perf_counter()
    if settle is not None:
        settle()
    settled = time.perf_counter()
    wrong = sum(1 for r in results if r != EXPECTED)
    if wrong:  # a correctness check of the harness, not a timing assertion
        raise RuntimeError(f"{wrong} of {runs} runs returned a wrong result")
    steps = runs * STEPS_PER_RUN
    return (settled - start) / steps * 1e6, (returned - start) / steps * 1e6


def worker(name: str, runs: int, warmup: int) -> None:
    """Run in a fresh process: one warm-up round, one timed round; print the figures as JSON."""
    run, settle = build(name)

    async def rounds() -> tuple[float, float]:
        await timed_round(run, settle, warmup)
        return await timed_round(run, settle, runs)

    total, loop = asyncio.run(rounds())
    print(json.dumps({"total_us": total, "loop_us": loop}))


def worker_environment(name: str, home: str) -> dict[str, str]:
    env = dict(os.environ)
    # Recording on is the normal configuration: the default recorder writes to
    # KAGURA_HOME/events.db, here a fresh directory, so no real store is touched.
    env["KAGURA_HOME"] = home
    for key in ("KAGURA_DB", "KAGURA_RECORD", "KAGURA_DURABLE", "KAGURA_MODEL_OVERRIDE"):
        env.pop(key, None)
    if name == KAGURA_OFF:
        env["KAGURA_RECORD"] = "0"
    # The peers' own tracing is off by default; make sure no environment turns it on.
    for key in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        env.pop(key, None)
    return env


@dataclass
class Contender:
    name: str
    total_us: list[float] = field(default_factory=list)  # per step, settle included
    loop_us: list[float] = field(default_factory=list)  # per step, until the last run returned
    settles: bool = False

    @staticmethod
    def _sizes(runs: int, warmup: int) -> list[str]:
        return ["--runs", str(runs), "--warmup", str(warmup)]

    def round(self, runs: int, warmup: int) -> None:
        home = tempfile.mkdtemp(prefix="kagura-bench-overhead-")
        try:
            done = subprocess.run(
                [*(sys.executable, __file__, "--worker", self.name), *self._sizes(runs, warmup)],
                env=worker_environment(self.name, home),
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
        finally:
            shutil.rmtree(home, ignore_errors=True)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: the worker failed:\n{done.stderr[-3000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        self.total_us.append(figures["total_us"])
        self.loop_us.append(figures["loop_us"])


def available(report: Report) -> list[str]:
    """The contenders whose framework is installed."""
    names = [RAW, KAGURA_ON, KAGURA_OFF, KAGURA_DURABLE]
    for name, module in ((LANGGRAPH, "langgraph"), (LLAMAINDEX, "workflows")):
        found = subprocess.run(
            [sys.executable, "-c", f"import importlib.util as u; assert u.find_spec({module!r})"],
            capture_output=True,
            check=False,
        )
        if found.returncode == 0:
            names.append(name)
        else:
            report.line(
                f"NOTE: {name} skipped ({module} is not installed); install the bench extra: "
                "pip install -e '.[bench]'"
            )
    return names


def measure(
    contenders: list[Contender], runs: int, warmup: int, rounds: int, say: Callable[[str], None]
) -> None:
    for r in range(rounds):
        shift = r % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        say(f"round {r + 1}/{rounds}")
        for c in order:
            c.round(runs, warmup)


def render(report: Report, contenders: list[Contender], runs: int, rounds: int) -> None:
    by_name = {c.name: c for c in contenders}
    raw = by_name[RAW]
    base = median(raw.total_us)
    table = report.table(
        f"µs per agent step ({runs:,} concurrent runs × {STEPS_PER_RUN} steps; median of "
        f"{rounds} interleaved rounds)",
        [
            "contender",
            "µs/step",
            "best round",
            "worst round",
            "× raw asyncio",
            "before the final flush: µs/step",
            "× raw",
        ],
    )
    for c in contenders:
        total = median(c.total_us)
        loop = median(c.loop_us)
        table.add(
            c.name,
            fmt(total, 2),
            fmt(min(c.total_us), 2),
            fmt(max(c.total_us), 2),
            ratio(total, base),
            fmt(loop, 2) if c.settles else "",
            ratio(loop, median(raw.loop_us)) if c.settles else "",
        )
    table.notes.append(
        "µs/step: wall time from starting the runs to the last result, plus (recording on, "
        "durable) the recorder's flush of everything queued, divided by runs × 4 steps."
    )
    table.notes.append(
        "before the final flush: the same without that flush (the writer process's work done while "
        "the runs were going on is in both)."
    )

    on = by_name.get(KAGURA_ON)
    if on is not None:
        paired = [k / r for k, r in zip(on.total_us, raw.total_us, strict=True)]
        on_ratio = median(on.total_us) / base
        report.check(
            "Kagura with recording on ≤ 3× raw asyncio per step",
            on_ratio <= 3.0,
            f"{on_ratio:.2f}× ({fmt(median(on.total_us), 2)} µs against {fmt(base, 2)} µs; "
            f"per-round ratios {min(paired):.2f}-{max(paired):.2f}×; before the final flush "
            f"{median(on.loop_us) / median(raw.loop_us):.2f}×)",
        )
        graph = by_name.get(LANGGRAPH)
        if graph is not None:
            faster = median(graph.total_us) / median(on.total_us)
            paired = [g / k for g, k in zip(graph.total_us, on.total_us, strict=True)]
            report.check(
                "Kagura with recording on ≥ 20× faster than LangGraph per step",
                faster >= 20.0,
                f"{faster:.1f}× ({fmt(median(graph.total_us), 2)} µs against "
                f"{fmt(median(on.total_us), 2)} µs; per-round {min(paired):.1f}-"
                f"{max(paired):.1f}×)",
            )


def run(args: argparse.Namespace, report: Report) -> None:
    out = console()
    names = available(report)
    if args.only:
        names = [n for n in names if n == RAW or any(o.lower() in n.lower() for o in args.only)]
    contenders = [Contender(n, settles=n in (KAGURA_ON, KAGURA_DURABLE)) for n in names]
    warmup = args.warmup or args.runs
    report.params.update(
        runs=args.runs, rounds=args.rounds, warmup=warmup, contenders=len(contenders)
    )
    measure(contenders, args.runs, warmup, args.rounds, lambda t: out.print(t, style="dim"))
    render(report, contenders, args.runs, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="concurrent runs per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up runs (default: --runs)")
    parser.add_argument(
        "--only", action="append", help="only contenders whose name contains TEXT (repeatable)"
    )
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.runs, args.warmup or args.runs)
        return

    report = Report(
        name="overhead",
        title="Framework overhead per agent step",
        command="python benchmarks/bench_overhead.py",
        description=(
            "One run: three agent calls in parallel, then one agent call over their results "
            "(4 steps), on a zero-latency fake provider. Raw asyncio, LangGraph and LlamaIndex "
            "call an `async def` echo; Kagura agents use the same echo behind the provider "
            "interface (`EchoModel`: a `ModelResponse` of the prompt) with every other setting "
            "at its default. Kagura with recording on writes to a fresh SQLite store in a "
            "temporary `KAGURA_HOME`; recording off is `KAGURA_RECORD=0`; durable runs journal "
            "every step (and record). All runs of a round are started at once. Every contender "
            "runs every round in a fresh process of its own (a warm-up round, then the timed "
            "one), taking turns in a rotating order."
        ),
    )
    started = time.perf_counter()
    run(args, report)
    report.finish(started, args.json)


if __name__ == "__main__":
    main()
