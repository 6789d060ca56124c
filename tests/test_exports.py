"""The public surface of ``kagura``: pinned so that an export is never added or lost by accident."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import kagura

# The public packages and modules, each with its __all__ as it should be: adding or removing an
# export is a one-line edit of its list here.
EXPORTS: dict[str, list[str]] = {
    "kagura": [
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
    ],
    "kagura.cli": [
        "main",
    ],
    "kagura.durable": [
        "DurableRun",
        "Journal",
        "Recovered",
        "Resumed",
        "RunRecord",
        "StepRecord",
        "journal_for",
        "lease_seconds",
        "recover",
        "replay",
        "resume_run",
        "step",
    ],
    "kagura.errors": [
        "BudgetExceeded",
        "CircuitOpenError",
        "EncryptionKeyError",
        "KaguraError",
        "MissingCredentialsError",
        "NonDeterminismError",
        "OutputParseError",
        "ProviderConnectionError",
        "ProviderError",
        "ProviderTimeout",
        "RunCancelledError",
        "RunError",
        "RunFailedError",
        "RunInProgressError",
        "RunTakenOverError",
        "StoreError",
        "StreamBrokenError",
        "TemplateError",
        "ToolLoopError",
        "UnsupportedRequestError",
        "UsageError",
        "WorkerLostError",
    ],
    "kagura.observability": [
        "Event",
        "EventStore",
        "Recorder",
        "Sink",
        "SpanEvent",
        "SpanFinished",
        "SpanStarted",
        "Status",
        "add_sink",
        "default_recorder",
        "install_default",
        "remove_sink",
        "uninstall_default",
    ],
    "kagura.observability.otel": [
        "OpenTelemetryExporter",
        "OpenTelemetryMissing",
        "instrument",
        "uninstrument",
    ],
    "kagura.parallel": [
        "Partial",
        "gather",
        "gather_partial",
        "map",
    ],
    "kagura.pricing": [
        "ModelPrice",
        "cost_of",
        "register_price",
        "unregister_price",
    ],
    "kagura.providers": [
        "Message",
        "Model",
        "ModelRequest",
        "ModelResponse",
        "OUTPUT_MODES",
        "OutputMode",
        "OutputSchema",
        "Profile",
        "StreamChunk",
        "TOOL_MODES",
        "ToolCall",
        "ToolMode",
        "ToolSpec",
        "model_id",
        "register_provider",
        "resolve_model",
    ],
    "kagura.providers.fake": [
        "FakeModel",
        "Reply",
        "Script",
        "example_for_schema",
    ],
    "kagura.ray": [
        "ClusterConfig",
        "RunHandle",
        "configure",
        "map",
        "shutdown",
        "submit",
    ],
    "kagura.resilience": [
        "Answer",
        "Attempt",
        "Backoff",
        "BudgetExceeded",
        "CircuitBreaker",
        "CircuitOpenError",
        "CostBudget",
        "DEFAULT_RETRY",
        "Fallback",
        "Permit",
        "Policies",
        "PolicyOptions",
        "RateLimiter",
        "Registry",
        "Retry",
        "RetryBudget",
        "RetryDetails",
        "UNSET",
        "Unset",
        "circuit_breaker",
        "current_cost_budget",
        "current_cost_budgets",
        "current_retry_budget",
        "current_retry_budgets",
        "exponential",
        "fixed",
        "is_transient",
        "jittered",
        "limit_model",
        "no_waits",
        "registry",
        "reset_breakers",
        "reset_rate_limits",
        "retry",
        "set_testing",
        "use_registry",
    ],
    "kagura.testing": [
        "CapturedEvents",
        "FakeModel",
        "Reply",
        "capture_events",
        "in_private_network",
        "override_model",
        "replay",
    ],
    "kagura.testing.fault_server": [
        "FAULT_KINDS",
        "Fault",
        "FaultServer",
        "RecordedRequest",
        "main",
    ],
}

# Public names in a module's namespace that are not exported: each is a name to make private
# (a leading underscore) or to export. Keep these lists shrinking; a module not named has none.
NOT_EXPORTED: dict[str, list[str]] = {
    "kagura.cli": [
        "CliError",
        "GROUPS",
        "Handler",
        "KINDS",
        "RUN_STATUSES",
        "STATUSES",
        "build_parser",
        "parse_since",
    ],
    "kagura.observability.otel": [
        "split_model_id",
    ],
    "kagura.parallel": [
        "K",
        "T",
        "U",
    ],
    "kagura.pricing": [
        "is_free",
        "load",
    ],
    "kagura.providers": [
        "UsageError",
        "model_override_var",
    ],
    "kagura.providers.fake": [
        "WORDS",
    ],
    "kagura.testing": [
        "Event",
        "Model",
        "SpanEvent",
        "SpanFinished",
        "SpanStarted",
        "add_sink",
        "model_override_var",
        "remove_sink",
    ],
    "kagura.testing.fault_server": [
        "DEFAULT_RANDOM_FAULTS",
        "REDACTED",
        "STREAM_FAULTS",
        "ScriptItem",
        "T",
        "logger",
    ],
}


def imported_for_own_use(module: ModuleType) -> set[str]:
    """Names the module's top-level imports bind that are its tools, not its surface: anything
    from outside kagura (typing, dataclasses, ...), and in a plain module (not a package, whose
    imports from kagura are what it re-exports) anything at all."""
    assert module.__file__ is not None
    is_package = Path(module.__file__).name == "__init__.py"
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    statements = [n for top in tree.body for n in ast.walk(top)]  # also under if/try
    names: set[str] = set()
    for node in statements:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not is_package or not alias.name.startswith("kagura"):
                    names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").startswith("kagura")
            if not is_package or not ours:
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def public_names(module: ModuleType) -> set[str]:
    """What ``from module import name`` finds in vars(module) and is not underscored: submodules,
    ``annotations`` and the module's own tools left out."""
    tools = imported_for_own_use(module)
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, ModuleType)
        and name != "annotations"
        and name not in tools
    }


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_all_is_pinned(name: str) -> None:
    exported = importlib.import_module(name).__all__
    assert sorted(exported) == EXPORTS[name]
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_every_exported_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    assert [n for n in module.__all__ if not hasattr(module, n)] == []


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_every_public_name_is_exported(name: str) -> None:
    module = importlib.import_module(name)
    assert sorted(public_names(module) - set(module.__all__)) == NOT_EXPORTED.get(name, [])


def test_every_public_package_is_pinned() -> None:
    """A new public package or module of kagura (no underscore in its path) gets a pinned list."""
    root = Path(kagura.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts) and parts[-1] != "__main__":
            found.add(".".join(parts))
    # The provider modules have no __all__ yet: their surface is OpenAIChatModel, LocalModel,
    # LiteLLMModel, reached through model strings.
    unpinned = {"kagura.providers.openai", "kagura.providers.local", "kagura.providers.litellm"}
    assert found - unpinned == set(EXPORTS)


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
