"""The public surface of ``kagura``: pinned so that an export is never added or lost by accident."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import kagura

EXPECTED_ALL = [
    "Agent",
    "AgentRun",
    "KaguraError",
    "MissingCredentialsError",
    "NonDeterminismError",
    "OutputParseError",
    "ProviderError",
    "RunError",
    "Tool",
    "ToolLoopError",
    "Usage",
    "UsageError",
    "Workflow",
    "__version__",
    "agent",
    "current_run_id",
    "get_current_span",
    "step",
    "tool",
    "workflow",
]


def test_all_is_pinned() -> None:
    assert sorted(kagura.__all__) == EXPECTED_ALL
    assert len(set(kagura.__all__)) == len(kagura.__all__)


def test_every_exported_name_exists() -> None:
    for name in kagura.__all__:
        assert hasattr(kagura, name), name


def test_decorators_import_from_top_level() -> None:
    from kagura import agent, tool, workflow

    assert callable(agent)
    assert callable(tool)
    assert callable(workflow)


def test_error_classes_keep_their_families() -> None:
    from kagura.errors import TemplateError

    assert issubclass(kagura.UsageError, kagura.KaguraError)
    assert issubclass(TemplateError, kagura.UsageError)
    assert issubclass(kagura.MissingCredentialsError, kagura.UsageError)
    assert issubclass(kagura.RunError, kagura.KaguraError)
    for run_error in (kagura.ProviderError, kagura.OutputParseError, kagura.ToolLoopError):
        assert issubclass(run_error, kagura.RunError)
        assert not issubclass(run_error, kagura.UsageError)


def test_import_kagura_stays_light() -> None:
    """Importing kagura must not pull in the provider SDKs or the price table."""
    code = textwrap.dedent(
        """
        import sys
        import kagura
        from kagura import agent, tool, workflow
        heavy = ("openai", "llama_cpp", "genai_prices", "litellm")
        print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
