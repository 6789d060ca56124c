"""Workflows of the durable-run tests, importable by the subprocesses that run and resume them
(``PYTHONPATH`` = the repository root; see ``runner.py``).

Agents name ``fake/echo`` so that a subprocess needs no provider; in-process tests override the
model with a :class:`~kagura.testing.FakeModel` to count requests. The ``crash_*`` agents talk to
an OpenAI-compatible server: the fault server, found through ``OPENAI_BASE_URL``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import kagura
from kagura import agent, workflow

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


#: What ``charge_then_note`` did after its step returned (a test reads it).
AFTER_CHARGE: list[str] = []


@workflow(durable=True)
async def charge_then_note(ledger: str) -> str:
    receipt = await kagura.step("charge", charge, ledger, "once")
    AFTER_CHARGE.append(receipt)
    return receipt
