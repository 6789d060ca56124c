"""What a clean install needs is declared: every import is in pyproject.toml, and CI runs the
Pythons the package claims.

A module that arrives only because some dependency depends on it today (httpx came with the
openai SDK until it moved to httpx2) breaks the next clean install; so every third-party module
imported anywhere in the repository must belong to a distribution pyproject.toml names.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("src", "tests", "benchmarks", "examples")
OURS = {"kagura", "tests", "benchmarks"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def declared_distributions() -> set[str]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    names = set()
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert name, requirement
        names.add(normalise(name.group()))
    return names


def imported_modules() -> Iterator[tuple[str, Path]]:
    """(top-level module, file) for each absolute import, at module level or inside a function."""
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            siblings = {p.stem for p in path.parent.iterdir() if p.suffix == ".py" or p.is_dir()}
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in OURS or top in siblings:
                        continue
                    yield top, path.relative_to(ROOT)


def test_every_imported_module_is_declared() -> None:
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    undeclared: dict[str, set[str]] = {}
    for module, path in imported_modules():
        if importlib.util.find_spec(module) is None:
            # Not installed here (an extra left out): no way to tell its distribution. CI installs
            # every extra, so it is checked there.
            continue
        # A namespace package (opentelemetry) has several distributions; one declared will do.
        if not {normalise(d) for d in providers.get(module, [])} & declared:
            undeclared.setdefault(module, set()).add(str(path))
    assert undeclared == {}, (
        "imported but not declared in pyproject.toml (dependencies or an extra): "
        + "; ".join(f"{m} ({', '.join(sorted(p))})" for m, p in sorted(undeclared.items()))
    )


def claimed_pythons() -> list[tuple[int, int]]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    versions = []
    for classifier in project["classifiers"]:
        found = re.fullmatch(r"Programming Language :: Python :: (\d+)\.(\d+)", classifier)
        if found:
            versions.append((int(found[1]), int(found[2])))
    return sorted(versions)


def test_ci_runs_on_the_oldest_and_the_newest_python_claimed() -> None:
    claimed = claimed_pythons()
    assert claimed, "pyproject.toml's classifiers name no Python version"
    oldest, newest = claimed[0], claimed[-1]
    requires = pyproject()["project"]["requires-python"]  # type: ignore[index]
    assert requires == f">={oldest[0]}.{oldest[1]}"
    run = (ROOT / ".ci" / "run").read_text()
    ci = re.search(r'^PYTHONS="([^"]*)"$', run, re.MULTILINE)
    assert ci, ".ci/run sets no PYTHONS"
    assert ci[1].split() == [f"{v[0]}.{v[1]}" for v in (oldest, newest)]
