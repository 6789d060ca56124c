"""Kagura: reliable LLM agent workflows on plain asyncio.

>>> from kagura import agent, workflow
"""

from ._agent import Agent, AgentRun, agent
from ._context import current_run_id, get_current_span
from ._tool import Tool, tool
from ._usage import Usage
from ._version import __version__
from ._workflow import Workflow, workflow
from .durable import step
from .errors import (
    KaguraError,
    MissingCredentialsError,
    NonDeterminismError,
    OutputParseError,
    ProviderError,
    RunError,
    ToolLoopError,
    UsageError,
)

__all__ = [
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
