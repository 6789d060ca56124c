"""The options of ``@agent`` and ``@workflow`` as a type checker sees them (mypy, strict)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

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
