"""Workflows of the durable-run tests, importable by the subprocesses that run and resume them
(``PYTHONPATH`` = the repository root; see ``runner.py``).

Agents name ``fake/echo`` so that a subprocess needs no provider; in-process tests override the
model with a :class:`~kagura.testing.FakeModel` to count requests. The ``crash_*`` agents talk to
an OpenAI-compatible server: the fault server, found through ``OPENAI_BASE_URL``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pydantic

import kagura
from kagura import agent, workflow
from kagura.providers import ModelRequest, ToolCall
from kagura.testing import FakeModel, Reply

GATE_TIMEOUT = 30.0


def price(item: str) -> str:
    """The price of one item."""
    return f"{item} costs 3"


@agent(model="fake/echo")
async def draft(topic: str) -> str:
    """Draft a note about {{ topic }}."""


@agent(model="fake/echo")
async def review(text: str) -> str:
    """Review this: {{ text }}"""


@agent(model="fake/echo")
async def summarise(text: str) -> str:
    """Summarise this: {{ text }}"""


@agent(model="fake/echo", tools=[price])
async def shopper(item: str) -> str:
    """Find out the PRICE of {{ item }}."""


def charge(ledger: str, what: str) -> str:
    """A side effect that must happen once per run: one line in the ledger file."""
    with open(ledger, "a", encoding="utf-8") as file:
        file.write(f"charged {what}\n")
    return f"receipt for {what}"


def require_file(path: str) -> str:
    """Fails unless ``path`` exists: lets a test make a run fail, then succeed on resume."""
    if not Path(path).exists():
        raise FileNotFoundError(f"gate {path} is closed")
    return "open"


async def wait_for_file(path: str) -> str:
    """Blocks (bounded) until ``path`` exists: holds a run in flight until the test lets it go."""
    deadline = time.monotonic() + GATE_TIMEOUT
    while not await asyncio.to_thread(os.path.exists, path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} was not opened within {GATE_TIMEOUT}s")
        await asyncio.sleep(0.01)
    return "passed"


@workflow(durable=True)
async def fanout(topic: str, ledger: str) -> dict[str, Any]:
    """Every kind of journaled step, in gather and create_task."""
    receipt = await kagura.step("charge", charge, ledger, topic)
    one, two = await asyncio.gather(draft(f"{topic} one"), draft(f"{topic} two"))
    reviewing = asyncio.create_task(review(one))
    bought = await shopper(topic)
    reviewed = await reviewing
    length = await kagura.step("count", len, one + two)
    return {
        "receipt": receipt,
        "drafts": [one, two],
        "review": reviewed,
        "bought": bought,
        "length": length,
    }


@workflow(durable=True, name="fanout")
async def fanout_with_summary(topic: str, ledger: str) -> dict[str, Any]:
    """``fanout`` changed to call one more agent: its journal lacks that step."""
    result = await fanout.fn(topic, ledger)
    result["summary"] = await summarise(result["review"])
    return result


@workflow
async def plain(topic: str) -> str:
    """Durable only when ``KAGURA_DURABLE=1`` says so."""
    text = await draft(topic)
    checked = await kagura.step("check", str.upper, text)
    return await review(checked)


@workflow(durable=False)
async def never_durable(topic: str) -> str:
    return await draft(topic)


@workflow(durable=True)
async def gated(topic: str, gate: str) -> str:
    """Draft, wait at the gate (file), review: a run that can be held in flight."""
    text = await draft(topic)
    await kagura.step("gate", wait_for_file, gate)
    return await review(text)


@workflow(durable=True)
async def checked(topic: str, gate: str) -> str:
    """Draft, then a step that fails while the gate file is missing, then review."""
    text = await draft(topic)
    await kagura.step("check", require_file, gate)
    return await review(text)


@workflow(durable=True, name="checked")
async def checked_other_inputs(topic: str, gate: str) -> str:
    """``checked`` changed so that its first agent call gets other inputs."""
    text = await draft(topic.upper())
    await kagura.step("check", require_file, gate)
    return await review(text)


@workflow(durable=True, name="checked")
async def checked_step_for_agent(topic: str, gate: str) -> str:
    """``checked`` changed so that a step named like the agent takes the agent's place."""
    text = await kagura.step("draft", str.upper, topic)
    await kagura.step("check", require_file, gate)
    return await review(text)


# -- against the fault server (OPENAI_BASE_URL) --------------------------------------------------


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def alpha(topic: str) -> str:
    """ALPHA report on {{ topic }}."""


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def beta(topic: str) -> str:
    """BETA report on {{ topic }}."""


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def gamma(topic: str) -> str:
    """GAMMA report on {{ topic }}, the SLOW one."""


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def combine(first: str, second: str, third: str) -> str:
    """COMBINE these: {{ first }} / {{ second }} / {{ third }}"""


#: The first word of each crash agent's prompt, to count the server's requests per prompt.
CRASH_PROMPTS = {"alpha": "ALPHA", "beta": "BETA", "gamma": "GAMMA", "combine": "COMBINE"}


@workflow(durable=True)
async def crash_pipeline(topic: str, ledger: str) -> dict[str, str]:
    """A paid side effect, three agents at once (one of which the server can hang), a fourth."""
    receipt = await kagura.step("charge", charge, ledger, topic)
    first, second, third = await asyncio.gather(alpha(topic), beta(topic), gamma(topic))
    final = await combine(first, second, third)
    return {"receipt": receipt, "final": final}


@workflow(durable=True)
async def nested(topic: str) -> list[str]:
    """Workflows inside a durable workflow are part of its run, not runs of their own."""
    return list(await asyncio.gather(plain(topic), plain(f"{topic}!")))


#: What ``see_then_note`` did after each journaled result reached it (a test reads it).
NOTED: list[str] = []


@workflow(durable=True)
async def see_then_note(kind: str, ledger: str) -> str:
    """One journaled result of ``kind`` (step, agent or tool), then a note that it was seen."""
    if kind == "step":
        result = await kagura.step("charge", charge, ledger, "once")
    elif kind == "agent":
        result = await draft("tea")
    else:
        result = await shopper("tea")  # its tool's result is journaled before the model sees it
    NOTED.append(result)
    return result


# -- crash tests: the workflow stops itself at the moment the test kills it ----------------------


def seen(label: str) -> None:
    """The workflow has seen a result: say so on stdout. At the label the test waits for
    (``KAGURA_TEST_STOP_AT``), or once this process has seen ``KAGURA_TEST_STOP_AFTER`` results,
    stop the whole process with SIGSTOP: every thread (the journal's writer too) halts at this
    very instant, and the test kills it there."""
    print(f"seen {label}", flush=True)
    _SEEN_HERE.append(label)
    after = os.environ.get("KAGURA_TEST_STOP_AFTER")
    if os.environ.get("KAGURA_TEST_STOP_AT") == label or (after and len(_SEEN_HERE) == int(after)):
        os.kill(os.getpid(), signal.SIGSTOP)


_SEEN_HERE: list[str] = []


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def link(topic: str) -> str:
    """LINK {{ topic }}"""


def tally(item: str) -> str:
    """Count one item: a side effect, one line in the file KAGURA_TEST_LEDGER names."""
    with open(os.environ["KAGURA_TEST_LEDGER"], "a", encoding="utf-8") as file:
        file.write(f"tally {item}\n")
    return f"{item} tallied"


def _tally_model(request: ModelRequest) -> str | Reply:
    """Asks for one tally of the item its prompt ends with, then reports the tool's result."""
    last = request.messages[-1]
    if last.get("role") == "tool":
        return f"done: {last.get('content')}"
    item = str(last.get("content")).rsplit(" ", 1)[-1]
    return Reply(tool_calls=(ToolCall("call_1", "tally", json.dumps({"item": item})),))


@agent(model=FakeModel([_tally_model] * 100_000, record_requests=False), tools=[tally])
async def counter(item: str) -> str:
    """TALLY {{ item }}"""


def stamp(ledger: str, what: str) -> str:
    """A side effect: one line in the ledger."""
    with open(ledger, "a", encoding="utf-8") as file:
        file.write(f"stamp {what}\n")
    return f"stamped {what}"


CHAIN_STEPS = 20


@workflow(durable=True)
async def chain(topic: str, ledger: str) -> list[str]:
    """Agent calls (to the fault server), tool calls and steps, one after the other; each result
    is announced with :func:`seen` as soon as the workflow has it."""
    results = []
    for i in range(CHAIN_STEPS):
        if i % 3 == 0:
            result = await link(f"{topic} {i}")
        elif i % 3 == 1:
            result = await counter(f"{topic}-{i}")
        else:
            result = await kagura.step("stamp", stamp, ledger, f"{topic} {i}")
        seen(str(i))
        results.append(result)
    return results


@workflow(durable=True)
async def burst(topic: str, calls: int) -> list[str]:
    """``calls`` agent calls at once, each announced with :func:`seen` as its result arrives
    (labelled with its prompt's topic and number, as ``reef b3``)."""

    async def one(i: int) -> str:
        result = await link(f"{topic} b{i}")
        seen(f"{topic} b{i}")
        return result

    return list(await asyncio.gather(*(one(i) for i in range(calls))))


@workflow(durable=True)
async def relay(topic: str, gate: str) -> str:
    """An agent call, a wait at the gate (file), another agent call: on the fault server, so
    that a test counts across processes what reached the provider."""
    first = await alpha(topic)
    await kagura.step("gate", wait_for_file, gate)
    return await beta(first)


def _open(gate: str) -> bool:
    return os.path.exists(gate)


@workflow(durable=True)
async def crash_two_stages(topics: list[str], gate: str) -> list[str]:
    """Two agents in a row in each of parallel branches, on the fault server, the second in a
    step named for its branch. The first topic's branch waits at the gate (a file) between them
    when it is closed: its second call then starts after the others', and on resume (the gate
    open, the first calls answered from the journal at once) before them."""

    async def branch(topic: str, first: bool) -> str:
        found = await alpha(topic)
        if first and not _open(gate):
            await wait_for_file(gate)
        return await kagura.step(f"beta {topic}", beta, found)

    return list(await asyncio.gather(*(branch(t, i == 0) for i, t in enumerate(topics))))


class Login(pydantic.BaseModel):
    user: str
    password: pydantic.SecretStr  # written masked: it cannot be replayed from the journal


class Score(pydantic.BaseModel):
    score: int

    @pydantic.field_validator("score")
    @classmethod
    def scaled(cls, value: int) -> int:
        return value * 10  # run again on a journaled value, it would scale it again


@agent(model="fake/echo")
async def log_in(user: str) -> Login:
    """Log in as {{ user }}."""


@agent(model="fake/echo")
async def rate(text: str) -> Score:
    """Rate {{ text }}."""


@workflow(durable=True)
async def signs_in(user: str) -> str:
    return (await log_in(user)).user


@workflow(durable=True)
async def rates(text: str) -> int:
    return (await rate(text)).score


@agent(model="fake/echo")
async def describe(image: bytes) -> str:
    """Describe an image of {{ image | length }} bytes."""


@workflow(durable=True)
async def describes(size: int) -> str:
    # Not UTF-8, so no JSON: the agent's inputs are hashed for the journal all the same.
    return await describe(b"\x89PNG" + bytes(size))
