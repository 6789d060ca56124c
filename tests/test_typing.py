"""The options of ``@agent`` and ``@workflow`` as a type checker sees them (mypy, strict), and
an agent's body as the README's "Type checkers" says to write it (mypy and pyright)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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


def _pyright(*sources: Path) -> dict[str, int]:
    """Pyright's errors in each of ``sources`` (one run: it takes seconds to start)."""
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
    errors = dict.fromkeys((source.name for source in sources), 0)
    for diagnostic in json.loads(result.stdout)["generalDiagnostics"]:
        if diagnostic["severity"] == "error":
            errors[Path(diagnostic["file"]).name] += 1
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
