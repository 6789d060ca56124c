"""``local/...`` agents under kagura.ray: answered by a pool of model actors, each loading the
embedded model once, shared by every worker and outliving a worker's SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

import kagura.ray
from kagura import UsageError, agent
from kagura.errors import ProviderError
from kagura.providers import ModelRequest, ModelResponse, ToolSpec, resolve_model
from kagura.ray._models import RemoteLocalModel, model_actors

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.local_model


# Numbers the embedded model repeats exactly (greedy): the right answer is the item itself.
NUMBERS = [17, 105, 1024, 12, 12, 1024, 105, 17]


@agent(model="local/smollm2", max_tokens=24, temperature=0)
async def repeat(n: int) -> int:
    """Repeat this number exactly: {{ n }}"""


async def worker_pid(_: object) -> int:
    return os.getpid()


async def model_class(_: object) -> str:
    return type(resolve_model("local/smollm2")).__name__


def actor_info() -> dict[str, dict[str, Any]]:
    """Each model actor of this job, by name: its pid, loads of the model, requests served."""
    names = model_actors()
    handles = [ray.get_actor(name, namespace="kagura") for name in names]
    return dict(zip(names, ray.get([handle.info.remote() for handle in handles]), strict=True))


@pytest.fixture
def two_model_actors(ray_cluster: None) -> Iterator[None]:
    kagura.ray.configure(workers=2, model_actors=2)
    yield
    kagura.ray.shutdown()
    assert model_actors() == []


def test_a_local_agent_runs_on_two_model_actors(two_model_actors: None) -> None:
    done = asyncio.run(kagura.ray.map(repeat, NUMBERS, progress=False))
    assert done.errors == {}
    assert [done.results[i] for i in range(len(NUMBERS))] == NUMBERS
    assert all(type(value) is int for value in done.results.values())

    # The workers resolved local/smollm2 to the actors, not to a model of their own.
    kinds = asyncio.run(kagura.ray.map(model_class, range(4), progress=False))
    assert set(kinds.results.values()) == {RemoteLocalModel.__name__}

    info = actor_info()
    assert len(info) == 2
    pids = {actor["pid"] for actor in info.values()}
    assert len(pids) == 2
    workers = asyncio.run(kagura.ray.map(worker_pid, range(8), progress=False))
    assert pids.isdisjoint(workers.results.values())
    assert [actor["loads"] for actor in info.values()] == [1, 1]
    # num_cpus=1 each: one llama.cpp thread, for the prompt as for the generation.
    assert [actor["threads"] for actor in info.values()] == [(1, 1), (1, 1)]
    served = [actor["served"] for actor in info.values()]
    assert sum(served) == len(NUMBERS)
    assert all(count > 0 for count in served), served


async def provider_errors(kind: str) -> type[BaseException]:
    model = resolve_model("local/smollm2")
    messages = [{"role": "user", "content": "Say hi."}]
    if kind == "tools":
        request = ModelRequest(messages, tools=[ToolSpec("look", "look", {"type": "object"})])
    else:
        request = ModelRequest(messages, max_tokens=4, extra={"no_such_setting": 1})
    try:
        await model.request(request)
    except Exception as error:
        return type(error)
    raise AssertionError("the request did not fail")


def test_errors_keep_their_types(two_model_actors: None) -> None:
    done = asyncio.run(kagura.ray.map(provider_errors, ["tools", "settings"], progress=False))
    assert done.errors == {}
    # What the in-process LocalModel raises: a usage error, and a provider error for a failed
    # generation, so that retries and fallbacks treat them alike.
    assert done.results == {0: UsageError, 1: ProviderError}


async def streamed(n: int) -> tuple[list[str], str, int, str]:
    model = resolve_model("local/smollm2")
    request = ModelRequest(
        [{"role": "user", "content": f"Repeat this number exactly: {n}"}],
        max_tokens=12,
        temperature=0,
    )
    deltas: list[str] = []
    final: ModelResponse | None = None
    async for chunk in model.stream(request):
        if isinstance(chunk, ModelResponse):
            final = chunk
        else:
            deltas.append(chunk)
    assert final is not None
    # Left after its first delta: the actor stops that generation.
    early = model.stream(request)
    first = await anext(early)
    await early.aclose()  # type: ignore[attr-defined]
    return deltas, final.text, final.usage.completion_tokens, str(first)


def test_a_local_model_streams_from_its_actor(two_model_actors: None) -> None:
    done = asyncio.run(kagura.ray.map(streamed, [17], progress=False))
    assert done.errors == {}
    deltas, text, tokens, first = done.results[0]
    assert len(deltas) > 1
    assert "".join(deltas) == text
    assert tokens > 0
    assert first == deltas[0]


def test_a_worker_killed_leaves_the_model_actors_running(two_model_actors: None) -> None:
    first = asyncio.run(kagura.ray.map(repeat, NUMBERS[:4], progress=False))
    assert first.errors == {}
    before = actor_info()
    assert len(before) == 2

    victim = asyncio.run(kagura.ray.map(worker_pid, [0], progress=False)).results[0]
    os.kill(victim, signal.SIGKILL)

    # Ray starts the worker again; the batch runs on it and on the other one.
    again = asyncio.run(kagura.ray.map(repeat, NUMBERS, progress=False))
    assert again.errors == {}
    assert [again.results[i] for i in range(len(NUMBERS))] == NUMBERS
    workers = asyncio.run(kagura.ray.map(worker_pid, range(8), progress=False))
    assert victim not in workers.results.values()

    after = actor_info()
    assert after.keys() == before.keys()
    for name in after:
        assert after[name]["pid"] == before[name]["pid"]
        assert after[name]["loads"] == 1  # not loaded again by the restarted worker
    assert sum(actor["served"] for actor in after.values()) == 4 + len(NUMBERS)
