"""Every Python block of the README runs as written (on the fake model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    # As a script, the way a reader runs it: `if __name__ == "__main__":` blocks run too.
    exec(compile(source, str(README), "exec"), {"__name__": "__main__"})


def test_the_type_checkers_block_runs_under_warnings_as_errors(tmp_path: Path) -> None:
    """Run from a file of its own, so the agent's body can be read (exec'd under README.md's
    name above, it cannot): the ``raise NotImplementedError`` the section recommends must not
    warn that the body is ignored."""
    section = README.read_text().split("### Type checkers", 1)[1].split("\n#", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert "raise NotImplementedError" in block
    script = tmp_path / "type_checkers.py"
    script.write_text(block)
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "KAGURA_MODEL": "fake"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
