"""The options of ``@agent`` and ``@workflow`` as a type checker sees them (mypy, strict), and
an agent's body as the README's "Type checkers" says to write it (mypy and pyright)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")


@pytest.fixture(autouse=True)
def _recursion_limit_kept() -> Iterator[None]:
    """mypy, run in this process, raises the recursion limit and leaves it raised: a later test
    that counts on reaching it (a return type nested deeper than pydantic can follow, in
    tests/test_output.py) then passed or failed by the order the tests ran in."""
    limit = sys.getrecursionlimit()
    yield
    sys.setrecursionlimit(limit)


USER_CODE = '''
from kagura import agent, workflow
from kagura.resilience import UNSET, Retry, Unset


@agent(model="fake", retry=Retry(attempts=2), timeout=5, provider_kwargs={"seed": 7})
async def count(text: str) -> int:
    """Count {{ text }}"""
    raise NotImplementedError


@agent(retry=3)  # wrong
async def wrong(text: str) -> int:
    """{{ text }}"""
    raise NotImplementedError


@workflow(retry=False, total_timeout=30, durable=True)
async def flow(text: str) -> int:
    return await count(text)


async def use() -> None:
    number: int = await flow("b")
    text: str = await count("a")  # wrong
    unset: Unset = UNSET
'''


def test_mypy_checks_the_options_of_agents_and_workflows(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(textwrap.dedent(USER_CODE))
    stdout, _, status = mypy_api.run(
        ["--strict", "--no-incremental", "--no-error-summary", "--hide-error-context", str(source)]
    )
    errors = sorted(
        (int(line.split(":")[1]), line.rsplit("[", 1)[-1].rstrip("]"))
        for line in stdout.splitlines()
        if ": error:" in line
    )
    lines = source.read_text().splitlines()
    decorator, result = (n for n, text in enumerate(lines, 1) if text.endswith("# wrong"))
    # @agent(retry=3): no overload takes it (and the function it makes is then untyped); an
    # int result is not a str.
    expected = [
        (decorator, "call-overload"),
        (decorator, "untyped-decorator"),
        (result, "assignment"),
    ]
    assert errors == expected, stdout
    assert status == 1


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_agent() -> str:
    """The Python block of the README's "Type checkers"."""
    section = README.read_text().split("### Type checkers", 1)[1].split("\n#", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return str(block)


def _mypy(source: Path, *options: str) -> list[str]:
    stdout, _, _ = mypy_api.run(
        ["--strict", "--no-incremental", "--no-error-summary", *options, str(source)]
    )
    return [line for line in stdout.splitlines() if ": error:" in line]


def _pyright_errors(*sources: Path) -> list[tuple[str, int]]:
    """Pyright's errors in ``sources``, as (file name, line) pairs (one run: it takes seconds to
    start)."""
    pyright = Path(sys.executable).with_name("pyright")
    if not pyright.exists():
        pytest.skip("pyright is not installed (the [dev] extra)")
    result = subprocess.run(
        [str(pyright), "--outputjson", "--pythonpath", sys.executable, *map(str, sources)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return [
        (Path(diagnostic["file"]).name, diagnostic["range"]["start"]["line"] + 1)
        for diagnostic in json.loads(result.stdout)["generalDiagnostics"]
        if diagnostic["severity"] == "error"
    ]


def _pyright(*sources: Path) -> dict[str, int]:
    """Pyright's errors in each of ``sources``."""
    errors = dict.fromkeys((source.name for source in sources), 0)
    for name, _ in _pyright_errors(*sources):
        errors[name] += 1
    return errors


def test_an_agent_written_as_the_readme_says_passes_mypy_and_pyright(tmp_path: Path) -> None:
    readme = _readme_agent()
    assert "raise NotImplementedError" in readme
    source = tmp_path / "readme_agent.py"
    source.write_text(readme)
    # Why it says so: the same agent with a body that is only its docstring fails both.
    bare = tmp_path / "bare_agent.py"
    bare.write_text(readme.replace("    raise NotImplementedError\n", ""))
    # And its other way: mypy's empty-body check off, and "..." ending the body for pyright.
    ellipsis = tmp_path / "ellipsis_agent.py"
    ellipsis.write_text(readme.replace("raise NotImplementedError", "..."))

    assert _mypy(source) == []
    assert [line.rsplit("[", 1)[-1] for line in _mypy(bare)] == ["empty-body]"]
    assert _mypy(ellipsis, "--disable-error-code", "empty-body") == []
    assert _pyright(source, bare, ellipsis) == {
        source.name: 0,
        bare.name: 1,
        ellipsis.name: 0,
    }


# What a user's type checker makes of Kagura's results: each ``assert_type`` fails (mypy and
# pyright both) where a result is ``Any`` or another type than the one the user wrote, and the
# calls marked "# wrong" must be flagged.
RESULTS = '''
import asyncio
from typing import assert_type

from kagura import AgentRun, agent, durable, step, tool, workflow
from kagura.errors import BudgetExceeded
from kagura.observability import EventStore
from kagura import parallel
from kagura.parallel import gather, gather_partial
from kagura.resilience import CircuitBreaker, CostBudget, Retry
from kagura.testing import FakeModel, override_model, replay


@agent
async def summarize(text: str) -> str:
    """Summarise: {{ text }}"""
    raise NotImplementedError


@agent
async def tag(text: str) -> list[str]:
    """Tags for: {{ text }}"""
    raise NotImplementedError


@tool
def convert(amount: float, currency: str) -> float:
    """Convert euros."""
    return amount


@tool
async def population(city: str) -> int:
    """Population of a city."""
    return len(city)


@Retry(attempts=3)
async def fetch(url: str) -> bytes:
    return url.encode()


@CircuitBreaker("svc")
async def ping() -> int:
    return 1


def publish(text: str) -> str:
    return text


async def count(text: str, *, name: str = "", fn: int = 0) -> int:
    return len(text)


@workflow(durable=True)
async def flow(texts: list[str]) -> int:
    # Overloaded functions: with an explicit Any in the coroutine's type, mypy answers Any.
    assert_type(await gather(*(summarize(t) for t in texts), limit=4), list[str])
    assert_type(await asyncio.gather(summarize(texts[0]), tag(texts[0])), tuple[str, list[str]])
    assert_type(await asyncio.gather(flow(texts), summarize.run("a")), tuple[int, AgentRun[str]])
    assert_type(await step("publish", publish, texts[0]), str)
    assert_type(await step("count", count, texts[0], name="n", fn=1), int)
    await step("publish", publish, 42)  # wrong
    await step("publish", publish)  # wrong
    return 1


def report(budget: CostBudget) -> None: ...


async def use(store: EventStore) -> None:
    assert_type(asyncio.create_task(summarize("a")), asyncio.Task[str])
    assert_type(await asyncio.wait_for(flow(["a"]), 1), int)
    assert_type(convert(1.0, "USD"), float)
    assert_type(await population("Paris"), int)
    assert_type(asyncio.create_task(fetch("https://example.org")), asyncio.Task[bytes])
    assert_type(asyncio.create_task(ping()), asyncio.Task[int])
    assert_type(await replay("run-1", flow), int)
    assert_type(await durable.replay("run-1", flow), int)
    await store.aget_executions(limt=5)  # wrong
    await store.astats(sincee=1)  # wrong
    await store.acost(bye="day")  # wrong
    with override_model(FakeModel(["negative"])) as fake:
        assert_type(fake, FakeModel)
    # Exceptions take their place in the results.
    assert_type(await gather(summarize("a"), return_exceptions=True), list[str | BaseException])
    assert_type(await parallel.map(summarize, ["a"]), list[str])
    assert_type(
        await parallel.map(summarize, ["a"], return_exceptions=True), list[str | BaseException]
    )
    assert_type((await gather_partial({"x": summarize("a")})).results, dict[str, str])
    assert_type((await gather_partial([summarize("a")])).errors, dict[int, Exception])
    try:
        await flow(["x"])
    except BudgetExceeded as e:
        report(e.budget)  # typed for the budget it is


def run() -> None:
    assert_type(asyncio.run(fetch("https://example.org")), bytes)
    assert_type(asyncio.run(summarize("a")), str)
'''


def test_results_keep_their_types_and_wrong_calls_are_flagged(tmp_path: Path) -> None:
    source = tmp_path / "user_results.py"
    source.write_text(RESULTS)
    wrong = [n for n, text in enumerate(RESULTS.splitlines(), 1) if text.endswith("# wrong")]
    errors = sorted(
        (int(line.split(":")[1]), line.rsplit("[", 1)[-1].rstrip("]"))
        for line in _mypy(source, "--hide-error-context")
    )
    assert errors == [(wrong[0], "call-overload"), (wrong[1], "call-overload")] + [
        (line, "call-arg") for line in wrong[2:]
    ], errors
    assert sorted({line for _, line in _pyright_errors(source)}) == wrong
