"""Streaming agent answers to the terminal as the model writes them.

``agent.stream(...)`` is an async iterator over the answer: the text deltas of a ``str`` agent,
or, for a typed agent, its value as the JSON grows (each partial value validated, the last item
being the validated result). The same retries, timeouts, recording and durable journaling apply
as to an awaited call; retries stop once something was shown, and closing the stream stops the
model's generation.

Sections:

1. Text, delta by delta
2. A typed result, redrawn as its fields arrive
3. Leaving early: the generation stops with the stream

Run it (no API key needed: agents that name no model run on the embedded SmolLM2-135M model):

    python examples/advanced_workflows/streaming_workflow.py
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import BaseModel, Field

from kagura import agent, workflow

# Bounded fields: a small model under a grammar cannot ramble past max_tokens (an answer cut
# off by max_tokens is never a typed result: it raises OutputParseError).


class Postcard(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)
    greeting: str = Field(max_length=60)  # last: the field seen growing


@agent(max_tokens=40, temperature=0)
async def describe(place: str) -> str:
    """Describe {{ place }} in one short sentence."""


@agent(max_tokens=80, temperature=0)
async def postcard(place: str) -> Postcard:
    """Write a postcard from {{ place }}: the city, its country and a short greeting."""


@agent(max_tokens=400, temperature=0)
async def essay(topic: str) -> str:
    """Write a long essay about {{ topic }}."""


def header(title: str) -> None:
    print(f"\n=== {title} ===")


def show(card: Postcard) -> None:
    """Redraw one line in a terminal; print a line per value anywhere else (a pipe, a log)."""
    line = f"{card.city}, {card.country}: {card.greeting!r}"
    if sys.stdout.isatty():
        print("\r\033[K" + line, end="", flush=True)
    else:
        print(line, flush=True)


@workflow
async def streaming_workflow(place: str) -> Postcard | None:
    header("1. Text, delta by delta")
    async for delta in describe.stream(place):
        print(delta, end="", flush=True)
    print()

    header("2. A typed result, redrawn as its fields arrive")
    card: Postcard | None = None
    async for card in postcard.stream(place):
        show(card)
    if sys.stdout.isatty():
        print()
    print("(the last value shown is the validated result)")

    header("3. Leaving early: the generation stops with the stream")
    words = 0
    async with essay.stream(place) as stream:  # closed when the block ends
        async for delta in stream:
            print(delta, end="", flush=True)
            words += len(delta.split())
            if words == 8:
                print("\n(left after 8 words of a 400-token essay: the model stops writing too)")
                break
        else:
            print("\n(the essay was over before 8 words)")
    return card


async def main() -> None:
    card = await streaming_workflow("Paris")
    print(f"\npostcard: {card!r}")


if __name__ == "__main__":
    asyncio.run(main())
