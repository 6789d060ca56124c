"""Streaming: what reading answers as they are generated costs the client (not a test).

``--streams`` (default 20) answers are streamed at once from the OpenAI-compatible
``FaultServer`` on 127.0.0.1, in a process of its own, which sends each answer a word per chunk
as fast as it can write them: the client reading the streams is the bottleneck. The figure is
the CPU of the client's process per chunk read. Contenders take turns in one process, for
``--rounds`` rounds; medians.

- aiohttp alone, the floor: the request, then the server-sent events read line by line and each
  chunk's JSON decoded, nothing else.
- the bare ``openai.AsyncOpenAI`` client (``stream=True``, its default HTTP client).
- a Kagura ``str`` agent's ``stream()``: the text deltas (recording on, the default).
- a Kagura agent typed with a pydantic model, its ``stream()``: each partial value that
  validates and differs from the one before, then the result. On answers of ``--words``, four
  times and sixteen times as many: a partial value is read from the whole answer so far, so
  what keeps the cost per chunk from growing with the answer is how seldom it is read (past
  256 characters, once per eighth of growth or per tenth of a second).

    .venv/bin/python benchmarks/bench_streaming.py [--streams 20] [--words 400] [--rounds 5]
"""

from __future__ import annotations

import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="kagura-bench-streaming-")
os.environ["KAGURA_HOME"] = _HOME  # recording on writes here, not to ~/.kagura
for _name in ("KAGURA_DB", "KAGURA_RECORD", "KAGURA_MODEL_OVERRIDE"):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pydantic  # noqa: E402
from _bench import Report, ServerProcess, console, fmt, median, run_recorded  # noqa: E402

from kagura import agent  # noqa: E402

#: Reads one whole stream for a prompt; returns how many chunks (or items) it read.
Read = Callable[[str], Awaitable[int]]


class Item(pydantic.BaseModel):
    name: str
    price: int
    tags: list[str]


class Catalogue(pydantic.BaseModel):
    title: str
    items: list[Item]


def text_answer(words: int) -> str:
    return " ".join(f"word{i}" for i in range(words))


def json_answer(words: int) -> str:
    """A ``Catalogue`` as JSON of about ``words`` words (what the server sends a word a chunk)."""
    items = [{"name": f"item {i}", "price": i, "tags": ["a", "b"]} for i in range(words // 8)]
    return json.dumps({"title": "a catalogue", "items": items})


#: The typed answers: the prompt that asks for each, and its size in multiples of ``--words``.
#: The server matches a prompt by the first rule it contains, so the longest prompts come first.
TYPED = (("json huge", 16), ("json large", 4), ("json", 1))


def serve(words: int) -> None:
    """The server process: the answers by prompt (``TYPED`` names the typed ones), until stdin
    closes. It records nothing: its ``KAGURA_HOME`` goes with it."""
    from kagura.testing.fault_server import Fault, FaultServer

    async def run() -> None:
        rules = [(prompt, Fault.ok(json_answer(times * words))) for prompt, times in TYPED]
        rules.append(("", Fault.ok(text_answer(words))))
        server = FaultServer(rules=rules, backlog=4096)
        async with server:
            print(server.base_url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(_HOME, ignore_errors=True)


@dataclass
class Contender:
    name: str
    read: Read
    prompt: str  # what the server answers it with (see serve)
    chunks: int = 0  # the answer's chunks, as the server sends them
    items: list[int] = field(default_factory=list)  # what the reader was shown, per stream
    walls: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process per round


async def fire(c: Contender, streams: int) -> None:
    cpu = time.process_time()
    started = time.perf_counter()
    counts = await asyncio.gather(*(c.read(f"{c.prompt} {i}") for i in range(streams)))
    c.walls.append(time.perf_counter() - started)
    c.cpu.append(time.process_time() - cpu)
    if min(counts) < 1:  # a check of the harness, not of timing
        raise RuntimeError(f"{c.name}: a stream read nothing")
    c.items.extend(counts)


async def main_async(args: argparse.Namespace, report: Report, base_url: str) -> None:
    import aiohttp
    from openai import AsyncOpenAI

    say = console().print
    url = base_url.rstrip("/") + "/chat/completions"
    session = aiohttp.ClientSession(headers={"Authorization": "Bearer bench"})
    client = AsyncOpenAI(api_key="bench", base_url=base_url, max_retries=0, timeout=600.0)

    async def alone(prompt: str) -> int:
        body = {
            "model": "fault-model",
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
        }
        chunks = 0
        async with session.post(url, json=body) as response:
            response.raise_for_status()
            async for line in response.content:
                if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                    json.loads(line[6:])
                    chunks += 1
        return chunks

    async def bare(prompt: str) -> int:
        stream = await client.chat.completions.create(
            model="fault-model", messages=[{"role": "user", "content": prompt}], stream=True
        )
        chunks = 0
        async for _ in stream:
            chunks += 1
        return chunks

    async def write(text: str) -> str:  # type: ignore[empty-body]  # the docstring is the prompt
        """{{ text }}"""

    async def catalogue(text: str) -> Catalogue:  # type: ignore[empty-body]
        """{{ text }}"""

    as_agent = agent(model="fault-model", base_url=base_url, api_key="bench", retry=False)
    text_agent = as_agent(write)
    typed_agent = as_agent(catalogue)

    def streamed(stream_of: Callable[[str], object]) -> Read:
        async def read(prompt: str) -> int:
            items = 0
            async with stream_of(prompt) as stream:  # type: ignore[attr-defined]
                async for _ in stream:
                    items += 1
            return items

        return read

    words = args.words

    def typed(prompt: str, times: int) -> Contender:
        answer = json_answer(times * words)
        name = f"Kagura typed agent, stream() ({len(answer):,} B of JSON)"
        return Contender(name, streamed(typed_agent.stream), prompt, len(answer.split()))

    contenders = [
        Contender("aiohttp alone (the floor)", alone, "text", words),
        Contender("bare openai.AsyncOpenAI, stream=True", bare, "text", words),
        Contender("Kagura str agent, stream()", streamed(text_agent.stream), "text", words),
        *(typed(prompt, times) for prompt, times in reversed(TYPED)),
    ]
    try:
        for c in contenders:
            say(f"warm-up: {c.name}", style="dim")
            await fire(c, min(args.streams, 5))
            c.walls.clear()
            c.cpu.clear()
            c.items.clear()
        for number in range(args.rounds):
            say(f"round {number + 1}/{args.rounds}", style="dim")
            shift = number % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                await fire(c, args.streams)
    finally:
        await session.close()
        await client.close()

    def per_chunk(c: Contender) -> float:
        return float(median(c.cpu) / (args.streams * c.chunks) * 1e6)

    floor = per_chunk(contenders[0])
    table = report.table(
        f"{args.streams} streams at once, a word a chunk (median of {args.rounds} rounds)",
        [
            "contender",
            "chunks a stream",
            "items shown a stream",
            "wall s",
            "client CPU µs/chunk",
            "× aiohttp alone",
        ],
    )
    for c in contenders:
        cpu = per_chunk(c)
        table.add(
            c.name,
            f"{c.chunks:,}",
            f"{median(c.items):,.0f}",
            fmt(median(c.walls), 3),
            fmt(cpu),
            f"{cpu / floor:.2f}×",
        )
    table.notes.append(
        "client CPU: CPU time of this process during the round (the server has its own), per "
        "chunk of the answers. items shown: what `async for` gave the reader (a chunk or a "
        "delta for the first three rows; partial values, then the result, for the typed agent)."
    )
    table.notes.append(
        "The typed agent's partial values come from pydantic's partial validation of the whole "
        "JSON so far, which costs time in proportion to the answer's length. Past 256 "
        "characters it is read once the JSON has grown by an eighth since the last reading, or "
        "a tenth of a second has passed, so its cost per chunk stays level as the answer grows "
        "(compare its three rows). Read at every chunk, as before, a whole answer cost time in "
        "proportion to its square: 194 µs a chunk for 11 KB in an earlier run of this table."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20, help="streams at once (default 20)")
    parser.add_argument("--words", type=int, default=400, help="words of an answer (default 400)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.words)
        return

    report = Report(
        name="streaming",
        title="Streaming: reading answers as they are generated",
        command="python benchmarks/bench_streaming.py",
        description=(
            f"{args.streams} answers streamed at once from a FaultServer on 127.0.0.1 in its own "
            "process, a word a chunk, as fast as it writes them: what the client spends per "
            "chunk, against aiohttp reading the same events and nothing else. Kagura agents run "
            "with the default settings (recording on) and `retry=False`."
        ),
        params={"streams": args.streams, "words": args.words, "rounds": args.rounds},
    )

    def run() -> None:
        with ServerProcess(__file__, "--words", str(args.words)) as server:
            asyncio.run(main_async(args, report, server.base_url))

    run_recorded(report, _HOME, args.json, run)


if __name__ == "__main__":
    main()
