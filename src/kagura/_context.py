"""The run context: which run and which span the running code belongs to.

One context variable holds the innermost open :class:`Span`. Because asyncio copies the context
into every task it creates, agent calls made inside ``asyncio.gather`` or ``create_task`` join the
workflow that started them with no help from the user. The recorder and the durable journal read
this context; nothing else needs to be passed around.
"""

from __future__ import annotations

import itertools
import os
import time
from contextvars import ContextVar
from typing import Literal

SpanKind = Literal["workflow", "agent", "llm", "tool", "step"]

# A process-unique prefix plus a counter is much cheaper than uuid4() on the hot path while staying
# unique across processes writing to one store.
_PREFIX = os.urandom(6).hex()
_counter = itertools.count(1)


def new_id() -> str:
    return f"{_PREFIX}{next(_counter):010x}"


class Span:
    """One unit of work in a run tree: a workflow run, an agent call, an LLM attempt or a tool."""

    __slots__ = (
        "_child_seq",
        "_children",
        "_key",
        "_position",
        "_seq",
        "depth",
        "kind",
        "name",
        "parent",
        "run_id",
        "span_id",
        "start_ns",
    )

    def __init__(
        self,
        kind: SpanKind,
        name: str,
        parent: Span | None,
        *,
        span_id: str | None = None,
    ) -> None:
        self.kind: SpanKind = kind
        self.name = name
        self.parent = parent
        self.span_id = span_id or new_id()
        self.run_id: str = parent.run_id if parent is not None else self.span_id
        self.depth: int = parent.depth + 1 if parent is not None else 0
        self.start_ns = time.time_ns()
        self._child_seq: dict[str, int] | None = None
        # The step key names the call site within its parent: name plus how many children of that
        # name the parent had started before. Tasks made by gather/create_task start in creation
        # order, so the key is the same on every execution of the same code path. The number is
        # taken now; the string is built only when someone asks (recording, durable runs).
        self._seq = parent._next_seq(name) if parent is not None else 0
        self._key: str | None = None
        # Its place among its parent's steps whatever their names (LLM attempts, whose number
        # varies with retries, are not steps): how a durable run notices a renamed step.
        self._children = 0
        self._position = -1
        if parent is not None and kind != "llm":
            self._position = parent._children
            parent._children += 1

    @property
    def parent_id(self) -> str | None:
        return self.parent.span_id if self.parent is not None else None

    @property
    def step_key(self) -> str:
        key = self._key
        if key is None:
            parent = self.parent
            key = self.name if parent is None else f"{parent.step_key}/{self.name}#{self._seq}"
            self._key = key
        return key

    def _next_seq(self, name: str) -> int:
        seen = self._child_seq
        if seen is None:
            seen = self._child_seq = {}
        seq = seen.get(name, 0)
        seen[name] = seq + 1
        return seq

    def __repr__(self) -> str:
        return f"Span({self.kind}:{self.name} id={self.span_id} run={self.run_id})"


current_span: ContextVar[Span | None] = ContextVar("kagura_current_span", default=None)


def get_current_span() -> Span | None:
    """The innermost open span of the running task, or ``None`` outside any agent or workflow."""
    return current_span.get()


def current_run_id() -> str | None:
    """The id of the top-level run the running code belongs to, or ``None`` outside any run."""
    span = current_span.get()
    return span.run_id if span is not None else None
