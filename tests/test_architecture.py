"""The import rules of docs/architecture.md that import-linter's contracts (pyproject.toml, run by
``make lint``) do not express: no import cycle between modules, and a subpackage's private modules
used only inside it. Imports inside functions count: grimp reads every import statement."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("kagura", include_external_packages=False)


def test_no_module_imports_itself_through_others(graph: grimp.ImportGraph) -> None:
    cycles = [
        (module, imported)
        for module in sorted(graph.modules)
        for imported in sorted(graph.find_modules_directly_imported_by(module))
        if graph.chain_exists(importer=imported, imported=module)
    ]
    assert cycles == []


def owner_of_private(module: str) -> str | None:
    """The package whose private module ``module`` is (``kagura.durable`` for
    ``kagura.durable._run``, ``kagura._storage`` for ``kagura._storage._schema``), or None for a
    public module."""
    parts = module.split(".")
    private = [
        i for i, part in enumerate(parts) if part.startswith("_") and not part.startswith("__")
    ]
    return ".".join(parts[: private[-1]]) if private else None


# kagura's own top-level modules (the agent, the workflow, the CLI, ...) are the core that wires
# the subpackages together, and use their internals; a subpackage never uses another's.
def test_a_subpackage_never_reaches_into_another_ones_private_modules(
    graph: grimp.ImportGraph,
) -> None:
    reaching = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            owner = owner_of_private(imported)
            if owner is None or owner == "kagura":
                continue
            if module == owner or module.startswith(owner + "."):
                continue
            if module.count(".") == 1:  # a top-level module of kagura: the core
                continue
            reaching.append((module, imported))
    assert reaching == []


def test_the_rule_sees_a_reach(graph: grimp.ImportGraph) -> None:
    assert owner_of_private("kagura.durable._run") == "kagura.durable"
    assert owner_of_private("kagura._storage._schema") == "kagura._storage"
    assert owner_of_private("kagura._storage") == "kagura"
    assert owner_of_private("kagura.durable") is None


def test_the_architecture_page_names_every_layer() -> None:
    """docs/architecture.md draws the layers the contract in pyproject.toml checks."""
    root = Path(__file__).parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    page = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [m.strip() for layer in contract["layers"] for m in layer.split("|")]
    assert [m for m in modules if f"`{m}`" not in page and f"`{m}/`" not in page] == []
