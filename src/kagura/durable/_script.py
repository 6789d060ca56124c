"""Loading a run's workflow without running the script that defines it.

``kagura runs resume``, :func:`kagura.testing.replay` and recovery find a run's workflow by
importing the file or module its target names, and importing runs the module's top-level code. A
script that calls ``asyncio.run(main())`` outside an ``if __name__ == "__main__":`` block would
start itself again, as a new run, while the old one is being resumed. Two defences:

* :func:`check_source` reads the module's source before any of it runs and refuses (with what to
  change) when its top-level code starts an event loop;
* :func:`loading_target` marks the import in progress, and :func:`check_not_loading`, called where
  durable runs start and agents are called, refuses work started by code the static check could
  not see (a helper in another module that runs the loop, for instance).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..errors import UsageError

# Calls that run an event loop to completion (or forever): the way a script's main code starts.
_LOOP_STARTERS = frozenset({"asyncio.run", "asyncio.Runner", "anyio.run", "trio.run", "uvloop.run"})
# Methods of an event loop that run it; the receiver is rarely a plain name worth resolving.
_LOOP_METHODS = frozenset({"run_until_complete", "run_forever"})
_LOOP_MODULES = frozenset(name.partition(".")[0] for name in _LOOP_STARTERS)

_GUARD = 'if __name__ == "__main__":'
_SHOWN_CALL_CHARS = 100
_SHOWN_STATEMENT_LINES = 8


# -- the static check ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Finding:
    """A call in code that runs on import, and the module-level statement it is part of."""

    line: int
    call: str
    statement: ast.stmt
    via: str = ""  # for a call of a function of the file: the loop it starts, and where


class _ImportTimeCalls(ast.NodeVisitor):
    """Finds the loop-starting calls among the statements that run when a module is imported.

    Function and lambda bodies are not entered (defining them runs none of their code), nor are
    ``if __name__ == "__main__":`` and ``if TYPE_CHECKING:`` blocks, which do not run on import.
    Class bodies are not entered either: they do run, but a loop started there is rare, and their
    methods would be mistaken for the module's functions. Module-level functions are remembered
    so that a call such as ``main()`` can be followed into the function's body (see
    :meth:`_follow`).
    """

    def __init__(self, source: str, names: dict[str, str], *, follow: bool) -> None:
        self.source = source
        # A local name -> the dotted name it was imported as ("run" -> "asyncio.run"). The loop
        # modules count as imported: `import asyncio` may sit in a block this walk skips.
        self.names = names
        self.follow = follow
        self.functions: dict[str, ast.FunctionDef] = {}
        self.found: list[_Finding] = []
        self._statement: ast.stmt | None = None

    def visit(self, node: ast.AST) -> None:
        # The module-level statement is what moves under the guard, with the loop or `try:`
        # around the call: the call alone may not make sense there.
        if self._statement is None and isinstance(node, ast.stmt):
            self._statement = node
            try:
                super().visit(node)
            finally:
                self._statement = None
        else:
            super().visit(node)

    def visit_body(self, body: list[ast.stmt]) -> None:
        for statement in body:
            self.visit(statement)

    # Scopes whose code does not run when they are defined.
    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.functions[node.name] = node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.functions.pop(node.name, None)  # calling it only makes a coroutine

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.functions.pop(node.name, None)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def visit_If(self, node: ast.If) -> None:
        guard = _guard(node.test)
        if guard == "main":
            self.visit_body(node.orelse)  # an `else:` of the guard does run on import
        elif guard == "not main":
            self.visit_body(node.body)
        elif guard == "type checking":
            self.visit_body(node.orelse)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.names[alias.asname] = alias.name
            else:
                top = alias.name.partition(".")[0]
                self.names[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = "." * node.level + (node.module or "")
        for alias in node.names:
            self.names[alias.asname or alias.name] = f"{module}.{alias.name}"

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if name in _LOOP_STARTERS or (
            isinstance(node.func, ast.Attribute) and node.func.attr in _LOOP_METHODS
        ):
            self._add(node, "")
        elif self.follow and isinstance(node.func, ast.Name) and node.func.id in self.functions:
            self._follow(node, self.functions[node.func.id])
        self.generic_visit(node)  # the arguments: `sys.exit(main())`

    def _follow(self, node: ast.Call, function: ast.FunctionDef) -> None:
        """A call of a function defined in the file: flagged when its own body starts a loop.

        One level only: ``main()`` calling ``asyncio.run`` is the common shape of a script.
        Deeper chains (``main()`` -> ``serve()`` -> ``asyncio.run``), and helpers imported from
        other modules, would need the whole call graph; what they start is caught while the
        module loads by :func:`check_not_loading` instead.
        """
        inner = _ImportTimeCalls(self.source, dict(self.names), follow=False)
        inner.visit_body(function.body)
        if inner.found:
            first = inner.found[0]
            via = f"calls {first.call} at line {first.line}"
            self._add(node, via)

    def _add(self, node: ast.Call, via: str) -> None:
        assert self._statement is not None
        text = ast.get_source_segment(self.source, node) or ast.unparse(node)
        text = " ".join(text.split())
        if len(text) > _SHOWN_CALL_CHARS:
            text = text[: _SHOWN_CALL_CHARS - 1] + "…"
        self.found.append(_Finding(node.lineno, text, self._statement, via))

    def _dotted(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.names.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None


def _guard(test: ast.expr) -> str | None:
    """What an ``if`` test says about when its body runs: ``main`` (only as a script), ``not
    main`` (only when imported), ``type checking`` (never), or ``None`` (no telling)."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        sides = {_name_or_text(test.left), _name_or_text(test.comparators[0])}
        if sides == {"__name__", "'__main__'"}:
            if isinstance(test.ops[0], ast.Eq):
                return "main"
            if isinstance(test.ops[0], ast.NotEq):
                return "not main"
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):  # `and` a condition
        return "main" if any(_guard(value) == "main" for value in test.values) else None
    if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    ):
        return "type checking"
    return None


def _name_or_text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return repr(node.value)
    return None


def import_time_calls(source: str, filename: str) -> list[_Finding]:
    """The loop-starting calls of ``source`` that would run when it is imported (none when it
    does not parse: the import reports the syntax error better)."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return []
    finder = _ImportTimeCalls(source, {name: name for name in _LOOP_MODULES}, follow=True)
    finder.visit_body(tree.body)
    return finder.found


def check_source(location: str, target: str) -> None:
    """Refuse, before any of it runs, to import a workflow's file or module (``location``, the
    part of ``target`` before the colon) whose top-level code starts an event loop."""
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            return  # the import says it is missing
        _check(importlib.util.decode_source(path.read_bytes()), str(path), str(path), target)
        return
    # Each package on the way is checked before it is imported: finding the spec of `a.b`
    # imports `a` (acceptable: `a` was checked on the previous turn), never `a.b` itself.
    parts = location.split(".")
    for end in range(1, len(parts) + 1):
        name = ".".join(parts[:end])
        if name in sys.modules:
            continue  # imported already: importing it again runs nothing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return  # the import says what is missing
        get_source = getattr(spec.loader, "get_source", None)
        try:
            source = get_source(name) if get_source is not None else None
        except (ImportError, OSError):
            source = None
        if source is None:
            continue  # compiled or built in: only the dynamic guard applies
        filename = spec.origin or name
        _check(source, filename, f"module {name} ({filename})", target)


def _check(source: str, filename: str, where: str, target: str) -> None:
    found = import_time_calls(source, filename)
    if found:
        raise UsageError(_refusal(source, filename, where, target, found))


def _refusal(source: str, filename: str, where: str, target: str, found: list[_Finding]) -> str:
    qualname = target.rpartition(":")[2]
    lines = [
        f"cannot load workflow {qualname!r} from {where}: its top-level code starts an event loop:"
    ]
    for finding in found:
        via = f", which {finding.via}" if finding.via else ""
        lines.append(f"  {filename}:{finding.line}: {finding.call}{via}")
    lines.append(
        "To resume (or replay) a run, kagura imports the file, and importing runs its top-level "
        "code: the script would start again, as a new run, while the old one is resumed. "
        "Nothing of this file has run."
    )
    statements: list[ast.stmt] = []
    for finding in found:
        if finding.statement not in statements:
            statements.append(finding.statement)
    code = "\n".join(_shown(source, statement) for statement in statements)
    those = "that statement" if len(statements) == 1 else "those statements"
    lines += [
        f"Move {those} under `{_GUARD}`, which runs only when the file is run as a script, "
        f"not when it is imported:",
        "",
        textwrap.indent(f"{_GUARD}\n{textwrap.indent(code, '    ')}", "    "),
        "",
        "then resume the run again.",
    ]
    return "\n".join(lines)


def _shown(source: str, statement: ast.stmt) -> str:
    text = ast.get_source_segment(source, statement, padded=True) or ast.unparse(statement)
    lines = textwrap.dedent(text).splitlines()
    if len(lines) > _SHOWN_STATEMENT_LINES:
        lines = [*lines[: _SHOWN_STATEMENT_LINES - 1], "..."]
    return "\n".join(lines)


# -- the dynamic guard --------------------------------------------------------------------------


@dataclass
class _Loading:
    target: str
    error: UsageError | None = None


# Imports in progress in any thread: when none (always, but during a resume's import), the check
# on the hot path is this one global test. The ContextVar then says whether the work that asks
# was started by the import itself: a loop run by the module's code (asyncio.run copies the
# context into its tasks), not another thread's workflows that happen to run meanwhile. A thread
# the module's code starts by hand does not inherit the context, and is not caught.
loads_in_progress = 0
_loads_lock = threading.Lock()
_loading: ContextVar[_Loading | None] = ContextVar("kagura_loading_target", default=None)


def check_not_loading(what: str) -> None:
    """Raise :class:`UsageError` when called from code run by the import of a run's workflow
    (in :func:`loading_target`): that code started ``what`` (a clause, such as "workflow
    'report' started a durable run") by surprise, as the script's main code would."""
    if loads_in_progress and (loading := _loading.get()) is not None:
        _refuse(loading, what)


def _refuse(loading: _Loading, what: str) -> NoReturn:
    location, _, qualname = loading.target.rpartition(":")
    started = _import_time_line()
    lines = [
        f"{what} while kagura was importing {location} to load workflow {qualname!r} (to "
        f"resume or replay a run of it): code that runs on import started it, so loading the "
        f"workflow would start the script again, as a new run."
    ]
    if started:
        lines.append(f"  started by the module-level code at {started}")
    lines += [
        f"Move the call that starts it (in {location}, or in a module it imports) under "
        f"`{_GUARD}`, which runs only when the file is run as a script, not when it is "
        f"imported; then resume the run again.",
    ]
    error = UsageError("\n".join(lines))
    if loading.error is None:
        loading.error = error
    raise error


def _import_time_line() -> str:
    """``file:line: code`` of the innermost module-level code on the stack: the statement of the
    module being imported that led here."""
    for frame in reversed(traceback.extract_stack()):
        if frame.name == "<module>" and not frame.filename.startswith("<"):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


@contextlib.contextmanager
def loading_target(target: str) -> Iterator[None]:
    """Mark the import of ``target``'s module in progress for :func:`check_not_loading`.

    The refusal stands even when the module's code catches it and carries on (or fails with
    another error): the import is then reported as refused, not as loaded.
    """
    global loads_in_progress
    loading = _Loading(target)
    with _loads_lock:
        loads_in_progress += 1
    token = _loading.set(loading)
    try:
        yield
    except (Exception, SystemExit) as exc:
        if loading.error is not None and exc is not loading.error:
            raise loading.error from exc
        raise
    finally:
        _loading.reset(token)
        with _loads_lock:
            loads_in_progress -= 1
    if loading.error is not None:
        raise loading.error
