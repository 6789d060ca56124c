"""Streaming from the embedded model: token by token from its worker thread, with the grammar and
usage of an awaited call, and stopped at the next token when the reader goes."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from kagura import agent, tool
from kagura.errors import UsageError
from kagura.providers import local
from kagura.testing import capture_events

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]

llama_cpp = pytest.importorskip("llama_cpp", reason="the [local] extra is not installed")

# SmolLM2's end-of-generation tokens, biased away: it writes on until max_tokens.
NEVER_STOP = {0: -100.0, 2: -100.0}


class City(BaseModel):
    name: str
    country: str


@agent(model="local/smollm2", max_tokens=24, temperature=0)
async def complete(text: str) -> str:
    """Continue this sentence: {{ text }}"""


@agent(model="local/smollm2", max_tokens=60, temperature=0)
async def city(text: str) -> City:
    """Name the city mentioned in this text and its country: {{ text }}"""


@agent(model="local/smollm2", max_tokens=2000, temperature=0, logit_bias=NEVER_STOP)
async def ramble(topic: str) -> str:
    """Write a very long essay about {{ topic }}."""


def tokens_evaluated() -> int:
    """Tokens llama.cpp evaluated so far, over every worker's instance (its own counters, which
    are not reset between generations once the instances are quiet)."""
    workers = local._workers
    assert workers is not None and workers.in_flight == 0
    return sum(llama_cpp.llama_perf_context(llm._ctx.ctx).n_eval for llm in workers._free)


async def test_text_streams_token_by_token_as_an_awaited_call_answers() -> None:
    with capture_events() as events:
        deltas = [delta async for delta in complete.stream("The sun rises in the")]
        answer = await complete("The sun rises in the")
    assert len(deltas) > 3
    assert "".join(deltas).strip() == answer  # the same settings: the same greedy answer
    streamed, awaited = events.spans(kind="llm")
    assert streamed.attributes["ttft_ms"] > 0
    assert streamed.usage == awaited.usage  # the usage an awaited call reports
    assert streamed.usage is not None and streamed.usage.completion_tokens > 0
    assert streamed.cost_usd == 0.0


async def test_a_typed_answer_streams_under_its_grammar() -> None:
    items = [item async for item in city.stream("I flew to Paris last spring.")]
    assert items and all(isinstance(item, City) for item in items)
    assert items[-1] == await city("I flew to Paris last spring.")


async def test_closing_a_stream_stops_the_generation_at_the_next_token() -> None:
    await local.LocalModel().prepare()
    before = tokens_evaluated()
    with capture_events() as events:
        async with ramble.stream("the sea") as stream:
            deltas = [await anext(stream) for _ in range(3)]
    assert len(deltas) == 3
    # Closing returned once the worker let go: no generation is left running...
    assert local._workers is not None and local._workers.in_flight == 0
    # ...and the one that was stopped made few of its 2,000 tokens (a handful, unless this
    # thread was held up for seconds while the worker's ran on).
    assert tokens_evaluated() - before < 400
    assert [s.status for s in events.spans(kind="llm")] == ["cancelled"]


async def test_cancelling_the_reading_task_stops_the_generation() -> None:
    await local.LocalModel().prepare()
    before = tokens_evaluated()
    first = asyncio.Event()

    async def read() -> None:
        async for _ in ramble.stream("the mountains"):
            first.set()

    task = asyncio.create_task(read())
    async with asyncio.timeout(120):
        await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert local._workers is not None and local._workers.in_flight == 0
    assert tokens_evaluated() - before < 400


async def test_native_tools_are_refused_when_streamed_as_when_awaited() -> None:
    calls: list[tuple[int, int]] = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    @agent(model="local/smollm2", tools=[add], tool_mode="native", max_tokens=16)
    async def calc(question: str) -> str:
        """Use the add tool to compute {{ question }}"""

    with pytest.raises(UsageError, match="no native tool calling") as awaited:
        await calc("2+3")
    with pytest.raises(UsageError, match="no native tool calling") as streamed:
        _ = [item async for item in calc.stream("2+3")]
    assert str(streamed.value) == str(awaited.value)
    assert calls == []
