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
from typing import Any, Literal

from ._checks import obeyed
from .errors import UsageError

SpanKind = Literal["workflow", "agent", "llm", "tool", "step"]

# A process-unique prefix plus a counter is much cheaper than uuid4() on the hot path while staying
# unique across processes writing to one store.
PREFIX = os.urandom(6).hex()
_counter = itertools.count(1)
# printf-style with the prefix baked in: cheaper than an f-string, for a text made for each span
# whose id is read.
_ID_FORMAT = PREFIX + "%010x"  # hex digits: no "%" to escape


def _new_prefix() -> None:
    """A forked child's spans must not take the ids its parent's take next: it inherits the
    counter, so it gets a prefix of its own."""
    global PREFIX, _ID_FORMAT
    PREFIX = os.urandom(6).hex()
    _ID_FORMAT = id_format(PREFIX)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_prefix)


#: The longest name of an agent, workflow or step: the length of the store's name columns.
MAX_NAME = 255


def checked_name(kind: str, name: object, *, plain: bool = True) -> str:
    """``name``, when the store can keep it as the name of a ``kind`` ("agent", "workflow",
    "step") and, if ``plain``, it has no character a terminal obeys (see
    :func:`~kagura._checks.obeyed`); else a
    :class:`~kagura.errors.UsageError` saying why. Said here rather than by the database:
    SQLite keeps a longer one, PostgreSQL refuses it when it is written."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"a {kind}'s name must be a non-empty str, got {name!r}")
    if len(name) > MAX_NAME:
        raise UsageError(
            f"{kind} name {name[:40]!r}... is {len(name)} characters long; names are at most "
            f"{MAX_NAME}, the length of the event store's name columns"
        )
    unseen = next((c for c in name if obeyed(c)), None) if plain else None
    if unseen is not None:
        # An escape sequence, a newline or a right-to-left override would be obeyed by a
        # terminal that shows the name as it is, split a row of `kagura monitor list`, or make
        # the name one that cannot be typed back (`--agent NAME`).
        raise UsageError(
            f"{kind} name {name!r} holds {unseen!r} (U+{ord(unseen):04X}), a control "
            f"character, a text-direction override or a line break, which a terminal would "
            f"obey rather than show: give it a name without it (@{kind}(name=...))"
        )
    return name


def new_id() -> str:
    return _ID_FORMAT % next(_counter)


def id_format(prefix: str) -> str:
    """The format that makes a span id of a process's numbers (``prefix``: its ``PREFIX``)."""
    return prefix.replace("%", "%%") + "%010x"


class Span:
    """One unit of work in a run tree: a workflow run, an agent call, an LLM attempt or a tool.

    It is also the record that sinks read: :func:`kagura._instrument.span_finished` fills in how
    it ended and adds its tokens, cost, LLM calls and retries to its parent's, so every span
    carries the totals of its subtree and a sink need not rebuild the tree.
    """

    __slots__ = (
        "_child_seq",
        "_children",
        "_id",
        "_key",
        "_n",
        "_parent_id",
        "_run",
        "_seq",
        "completion_tokens",
        "cost",
        "end_ns",
        "error",
        "error_type",
        "kind",
        "llm_calls",
        "name",
        "parent",
        "position",
        "prompt_tokens",
        "result",
        "retries",
        "start_ns",
        "status",
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
        self.name: str = name
        self._children = 0
        self.parent: Span | None = parent
        # The id is a number until someone reads it as text (span_id): most never are in this
        # process, since the recorder sends the number and the writer makes the text (measured:
        # formatting it took a tenth of an agent call with recording off). The run's too.
        self._id = span_id
        self._n = 0 if span_id else next(_counter)
        self._parent_id: str | None = None  # a detached span's, given as text
        if parent is not None:
            self._run: int | str = parent._run
            # The step key names the call site within its parent: name plus how many children of
            # that name the parent had started before. Tasks made by gather/create_task start in
            # creation order, so the key is the same on every execution of the same code path.
            # The number is taken now; the string is built only when someone asks for it.
            # (Inlined rather than a method: every span pays for it.)
            seen = parent._child_seq
            if seen is None:
                seen = parent._child_seq = {}
            self._seq = seq = seen.get(name, 0)
            seen[name] = seq + 1
            # Its place among its parent's steps whatever their names (LLM attempts, whose number
            # varies with retries, are not steps): how a durable run notices a renamed step.
            if kind != "llm":
                self.position: int = parent._children
                parent._children += 1
            else:
                self.position = -1
        else:
            self._run = span_id or self._n
            self._seq = 0
            self.position = -1
        self.start_ns: int = time.time_ns()
        self._child_seq: dict[str, int] | None = None
        self._key: str | None = None
        # How it ended; "running" until span_finished sets the rest and then, last, the status.
        self.status: str = "running"
        self.end_ns: int = 0
        self.error: str | None = None
        self.error_type: str | None = None
        #: What it ended with (output, answered_by, finish_reason, ...), when someone records it.
        self.result: dict[str, Any] | None = None
        # Totals over the subtree, its own LLM attempt included.
        self.prompt_tokens: int = 0
        self.completion_tokens: int = 0
        self.cost: float | None = 0.0
        self.llm_calls: int = 0
        self.retries: int = 0

    @classmethod
    def detached(
        cls,
        kind: SpanKind,
        name: str,
        span_id: str,
        parent_id: str | None,
        run_id: str,
        step_key: str,
        start_ns: int,
        parent: Span | None = None,
    ) -> Span:
        """A span rebuilt from its recorded ids rather than opened by running code."""
        span = cls(kind, name, None, span_id=span_id)
        span.parent = parent
        span._parent_id = parent_id
        span._run = run_id
        span._key = step_key
        span.start_ns = start_ns
        return span

    @property
    def span_id(self) -> str:
        span_id = self._id
        if span_id is None:
            span_id = self._id = _ID_FORMAT % self._n
        return span_id

    @property
    def run_id(self) -> str:
        """The id of the run: its root span's."""
        run = self._run
        if type(run) is str:
            return run
        run = self._run = _ID_FORMAT % run
        return run

    @property
    def parent_id(self) -> str | None:
        parent = self.parent
        return parent.span_id if self._parent_id is None and parent is not None else self._parent_id

    @property
    def step_key(self) -> str:
        key = self._key
        if key is None:
            parent = self.parent
            key = self.name if parent is None else f"{parent.step_key}/{self.name}#{self._seq}"
            self._key = key
        return key

    # -- for sinks that send spans elsewhere (the recorder) --------------------------------------

    def wire_ids(self) -> tuple[int | str, int | str, int | str | None]:
        """The span's id, its run's and its parent's, each as text if someone has read it as
        text, else as its number in this process: ``id_format(PREFIX) % number`` makes the text,
        in whichever process needs it (the recorder's writer does). Formatting an id costs
        about 100 ns, and most are never read as text in the process that made them."""
        parent = self.parent
        parent_id: int | str | None = self._parent_id
        if parent_id is None and parent is not None:
            parent_id = parent._id or parent._n
        return self._id or self._n, self._run, parent_id

    def wire_step_key(self) -> tuple[str | None, int | None]:
        """The span's step key as ``(key, None)`` when it is known as text (``(None, None)``
        for a run's root span no one asked), else as ``(parent's step key, seq)``: the key is
        then ``f"{parent_key}/{name}#{seq}"`` (see :attr:`step_key`), built in whichever
        process needs it."""
        key = self._key
        parent = self.parent
        if key is not None or parent is None:
            return key, None
        return parent.step_key, self._seq

    def __repr__(self) -> str:
        return f"Span({self.kind}:{self.name} id={self.span_id} run={self.run_id})"


current_span: ContextVar[Span | None] = ContextVar("kagura_current_span", default=None)
#: When the agent call under way must end (``time.monotonic()``), if it has a total timeout: the
#: retries don't start a wait past it, and a span cancelled once it has passed was cut short by
#: that timeout, so it is recorded as timed out rather than cancelled.
call_deadline: ContextVar[float | None] = ContextVar("kagura_call_deadline", default=None)


def past_call_deadline() -> bool:
    """Whether the agent call under way has run past its total timeout: what was cancelled now
    was cut short by that timeout."""
    deadline = call_deadline.get()
    return deadline is not None and time.monotonic() >= deadline


#: The owner token the next durable run started in this context takes, rather than one of its
#: own (``kagura.ray``: a submitted run's, chosen by its driver, so that the driver can tell the
#: run its handle's task holds from one that task only waits for).
run_owner: ContextVar[str | None] = ContextVar("kagura_run_owner", default=None)


def get_current_span() -> Span | None:
    """The innermost open span of the running task, or ``None`` outside any agent or workflow."""
    return current_span.get()


def current_run_id() -> str | None:
    """The id of the top-level run the running code belongs to, or ``None`` outside any run."""
    span = current_span.get()
    return span.run_id if span is not None else None
