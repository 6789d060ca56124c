"""Framework overhead per agent step: raw asyncio, Kagura (recording on, off, durable), LangGraph
and LlamaIndex Workflows, side by side (not a test: it prints figures; see benchmarks/README.md).

The workload of one run: three agent calls in parallel, then one agent call over their three
results (4 steps). The provider is a zero-latency fake (the awaited call returns at once), so what
is measured is the framework. ``--runs`` runs (default 2,000) are started at once with
``asyncio.gather`` and timed from the first call to the last result; every contender does one
round in turn (in a rotating order), over ``--rounds`` rounds, after one untimed warm-up round
each. Figures are medians over the rounds, in µs per agent step; ratios are against raw asyncio
measured in the same rounds.

    .venv/bin/python benchmarks/bench_overhead.py [--runs 2000] [--rounds 7] [--only kagura]
"""

from __future__ import annotations

import os
import tempfile

# Recording on is the normal configuration: the default recorder writes to KAGURA_HOME/events.db.
# Point it at a fresh directory before kagura is imported, so no real store is touched.
_HOME = tempfile.mkdtemp(prefix="kagura-bench-overhead-")
os.environ["KAGURA_HOME"] = _HOME
for _name in ("KAGURA_DB", "KAGURA_RECORD", "KAGURA_DURABLE", "KAGURA_MODEL_OVERRIDE"):
    os.environ.pop(_name, None)
# The peers' own tracing is off by default; make sure no environment turns it on.
for _name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import TypedDict  # noqa: E402

from _bench import Report, console, fmt, median, ratio, run_recorded  # noqa: E402

from kagura import _instrument, agent, workflow  # noqa: E402
from kagura.providers import Model, ModelRequest, ModelResponse  # noqa: E402
from kagura.observability._recorder import Recorder, default_recorder  # noqa: E402

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


class EchoModel(Model):
    """The zero-latency provider of Kagura: the same echo as ``fake_llm``, behind the provider
    interface (a ``ModelResponse`` with no usage). Not ``model="fake"``: ``FakeModel`` is a test
    double (scripts, request history, word-count usage) and its own work is not framework work."""

    provider = "fake"  # a free provider: its price is looked up as for any model
    model_name = "bench-echo"

    async def request(self, request: ModelRequest) -> ModelResponse:
        return ModelResponse(request.messages[-1]["content"])


# Every other setting is the default (retry, breaker, timeouts): the normal configuration.
@agent(model=EchoModel())
async def summarise(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
    """Summarise: {{ text }}"""


async def _fan_in(text: str) -> str:
    a, b, c = await asyncio.gather(summarise(text), summarise(text), summarise(text))
    return await summarise(a + b + c)


kagura_run = workflow(name="fan_in")(_fan_in)
kagura_durable_run = workflow(name="fan_in_durable", durable=True)(_fan_in)


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
    builder.add_node("join", join)  # type: ignore[call-overload]
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
            text = "".join(e.out for e in done)  # type: ignore[attr-defined]
            return StopEvent(result=await fake_llm(PROMPT.format(text=text)))

    flow = FanIn(timeout=None)  # the default 45 s would cut off a large concurrent batch

    async def run(text: str) -> str:
        return str(await flow.run(text=text))

    return run


# -- measuring ---------------------------------------------------------------------------------


def _nothing() -> None:
    pass


@dataclass
class Contender:
    name: str
    run: Callable[[str], Awaitable[str]]
    #: Called before and after each round, outside the timed window.
    before: Callable[[], None] = _nothing
    after: Callable[[], None] = _nothing
    #: Called inside the timed window once every run has returned: the writer's remaining work.
    settle: Callable[[], None] | None = None
    total_us: list[float] = field(default_factory=list)  # per step, settle included
    loop_us: list[float] = field(default_factory=list)  # per step, until the last run returned

    async def round(self, runs: int) -> tuple[float, float]:
        """(µs per step with ``settle``, µs per step until the last result) for one round."""
        self.before()
        gc.collect()
        start = time.perf_counter()
        results = await asyncio.gather(*(self.run(TEXT) for _ in range(runs)))
        returned = time.perf_counter()
        if self.settle is not None:
            self.settle()
        settled = time.perf_counter()
        self.after()
        wrong = sum(1 for r in results if r != EXPECTED)
        if wrong:  # a correctness check of the harness, not a timing assertion
            raise RuntimeError(f"{self.name}: {wrong} of {runs} runs returned a wrong result")
        steps = runs * STEPS_PER_RUN
        return (settled - start) / steps * 1e6, (returned - start) / steps * 1e6


def build_contenders(report: Report) -> list[Contender]:
    recorder_holder: list[Recorder] = []

    def recorder() -> Recorder:
        return recorder_holder[0]

    def recording_off() -> None:
        _instrument.remove_sink(recorder())

    def recording_on() -> None:
        _instrument.add_sink(recorder())

    def flush() -> None:
        if not recorder().flush(timeout=600):
            raise RuntimeError("the recorder did not flush")

    contenders = [
        Contender(RAW, raw_run),
        Contender(KAGURA_ON, kagura_run, before=recording_on, settle=flush),
        Contender(KAGURA_OFF, kagura_run, before=recording_off, after=recording_on),
        Contender(KAGURA_DURABLE, kagura_durable_run, before=recording_on, settle=flush),
    ]
    try:
        contenders.append(Contender(LANGGRAPH, build_langgraph()))
    except ImportError as exc:
        report.line(
            f"NOTE: LangGraph skipped ({exc}); install the bench extra: pip install -e '.[bench]'"
        )
    try:
        contenders.append(Contender(LLAMAINDEX, build_llamaindex()))
    except ImportError as exc:
        report.line(
            f"NOTE: LlamaIndex Workflows skipped ({exc}); install the bench extra: "
            "pip install -e '.[bench]'"
        )

    recorder_holder.append(_install_recorder())
    return contenders


def _install_recorder() -> Recorder:
    """The default recorder, installed as the first Kagura call would (KAGURA_RECORD is unset)."""
    _instrument.ensure_recording()
    installed = default_recorder()
    if installed is None or installed not in _instrument.sinks():
        raise RuntimeError("the default recorder is not installed: is KAGURA_RECORD=0 set?")
    if not installed.flush():
        raise RuntimeError(f"the default recorder cannot write to {installed.url}")
    return installed


async def measure(
    contenders: list[Contender], runs: int, warmup: int, rounds: int, say: Callable[[str], None]
) -> None:
    for c in contenders:
        say(f"warm-up: {c.name} ({warmup} runs)")
        await c.round(warmup)
    for r in range(rounds):
        shift = r % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        say(f"round {r + 1}/{rounds}")
        for c in order:
            total, loop = await c.round(runs)
            c.total_us.append(total)
            c.loop_us.append(loop)


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
            fmt(loop, 2) if c.settle is not None else "",
            ratio(loop, median(raw.loop_us)) if c.settle is not None else "",
        )
    table.notes.append(
        "µs/step: wall time from starting the runs to the last result, plus (recording on, "
        "durable) the recorder's flush of everything queued, divided by runs × 4 steps."
    )
    table.notes.append(
        "before the final flush: the same without that flush (the writer thread's work done while "
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


async def main_async(args: argparse.Namespace, report: Report) -> None:
    out = console()
    contenders = build_contenders(report)
    if args.only:
        contenders = [
            c
            for c in contenders
            if c.name == RAW or any(o.lower() in c.name.lower() for o in args.only)
        ]
    report.params.update(
        runs=args.runs,
        rounds=args.rounds,
        warmup=args.warmup or args.runs,
        contenders=len(contenders),
    )
    await measure(
        contenders,
        args.runs,
        args.warmup or args.runs,
        args.rounds,
        lambda text: out.print(text, style="dim"),
    )
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
    args = parser.parse_args()

    report = Report(
        name="overhead",
        title="Framework overhead per agent step",
        command="python benchmarks/bench_overhead.py",
        description=(
            "One run: three agent calls in parallel, then one agent call over their results "
            "(4 steps), on a zero-latency fake provider. Raw asyncio, LangGraph and LlamaIndex "
            "call an `async def` echo; Kagura agents use the same echo behind the provider "
            "interface (`EchoModel`: a `ModelResponse` of the prompt) with every other setting "
            "at its default. Kagura with recording on writes to a fresh "
            "SQLite store in a temporary `KAGURA_HOME`; recording off removes the recorder's sink "
            "for those rounds; durable runs journal every step (and record). All runs of a round "
            "are started at once; contenders take turns, in a rotating order, in one process."
        ),
    )
    run_recorded(report, _HOME, args.json, lambda: asyncio.run(main_async(args, report)))


if __name__ == "__main__":
    main()
