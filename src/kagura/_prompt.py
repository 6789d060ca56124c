"""An agent's docstring as a Jinja2 prompt template, checked against its signature once."""

from __future__ import annotations

import ast
import inspect
import textwrap
import tokenize
import warnings
from collections.abc import Callable
from typing import Any

from jinja2 import (
    TemplateRuntimeError,
    TemplateSyntaxError,
    meta,
    nodes,
)

from ._sandbox import environment
from .errors import TemplateError

#: What a tag that loads another template does, as an error says it.
_TAG_OF = {
    nodes.Extends: "extends",
    nodes.Include: "includes",
    nodes.Import: "imports",
    nodes.FromImport: "imports from",
}


class PromptTemplate:
    """An agent's docstring compiled as a Jinja2 template, checked against its signature."""

    __slots__ = ("_format", "_names", "_pieces", "_template", "_var_keyword", "owner", "source")

    def __init__(self, fn: Callable[..., Any], signature: inspect.Signature) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        self.owner: str = f"agent {name!r}"
        doc = fn.__doc__
        if doc is None or not doc.strip():
            raise TemplateError(
                f"agent {name!r} has no docstring: an agent's docstring is its prompt template, "
                f'e.g. """Summarise {{{{ text }}}} in one sentence."""'
            )
        self.source: str = inspect.cleandoc(doc)
        env = environment()
        try:
            parsed = env.parse(self.source)
        except TemplateSyntaxError as exc:
            raise TemplateError(
                f"agent {name!r}: invalid prompt template at docstring line {exc.lineno}: "
                f"{exc.message} (to write {{{{, {{% or {{# as text, put it between "
                f"{{% raw %}} and {{% endraw %}})"
            ) from exc
        params = signature.parameters
        # Keywords caught by **kwargs are template variables too (the check below is skipped).
        self._var_keyword = next((p.name for p in params.values() if p.kind is p.VAR_KEYWORD), None)
        if self._var_keyword is None:
            try:
                undeclared = meta.find_undeclared_variables(parsed)
            except TemplateSyntaxError as exc:  # an unknown filter, found when it is compiled
                raise TemplateError(
                    f"agent {name!r}: invalid prompt template at docstring line {exc.lineno}: "
                    f"{exc.message}"
                ) from exc
            unknown = sorted(undeclared - set(params) - set(env.globals))
            if unknown:
                raise TemplateError(
                    f"agent {name!r}: the prompt uses {', '.join(unknown)} but the function has no "
                    f"such parameter (parameters: {', '.join(params) or 'none'})"
                )
        for test in parsed.find_all(nodes.Test):
            if test.name not in env.tests:
                raise TemplateError(
                    f"agent {name!r}: invalid prompt template at docstring line {test.lineno}: "
                    f"there is no test named {test.name!r} (tests: {', '.join(sorted(env.tests))})"
                )
        shared = next(
            parsed.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)), None
        )
        if shared is not None:
            raise TemplateError(
                f"agent {name!r}: the prompt template {_TAG_OF[type(shared)]} another template "
                f"(docstring line {shared.lineno}), but an agent's prompt has no templates to "
                f"load: write the text in the docstring (a {{% macro %}} there may repeat a "
                f"part), or pass it in as an argument"
            )
        try:
            self._template = env.from_string(parsed)
        except TemplateSyntaxError as exc:  # an unknown filter, found when it is compiled
            raise TemplateError(
                f"agent {name!r}: invalid prompt template at docstring line {exc.lineno}: "
                f"{exc.message}"
            ) from exc
        self._pieces = (
            _plain_substitutions(parsed, set(params)) if self._var_keyword is None else None
        )
        # The plain case as one %-format: ``%s`` is ``str()``, as Jinja's ``{{ x }}`` is.
        self._format: str | None = None
        self._names: tuple[str, ...] = ()
        if self._pieces is not None:
            self._format = "".join(
                "%s" if is_name else piece.replace("%", "%%") for is_name, piece in self._pieces
            )
            self._names = tuple(piece for is_name, piece in self._pieces if is_name)

    def render(self, arguments: dict[str, Any]) -> str:
        """The prompt for ``arguments``, the template's variables by name."""
        template = self._format
        if template is not None:
            # Text and {{ parameter }} only: the same string Jinja would build, without a
            # render context per call (the most common prompts, on the hot path).
            names = self._names
            try:
                if len(names) == 1:
                    return template % (arguments[names[0]],)
                return template % tuple([arguments[name] for name in names])
            except Exception as exc:  # an argument whose __str__ raises
                raise self._failed(exc) from exc
        if self._var_keyword is not None:
            arguments = {**arguments.get(self._var_keyword, {}), **arguments}
        try:
            return self._template.render(arguments)
        except Exception as exc:  # undefined attributes, sandbox refusals, a filter that raised
            raise self._failed(exc) from exc

    def _failed(self, error: Exception) -> TemplateError:
        try:
            said = str(error)
        except Exception:
            said = "(its message cannot be shown)"
        if not isinstance(error, TemplateRuntimeError):  # the arguments' own code, or a filter's
            said = f"{type(error).__name__}: {said}"
        return TemplateError(f"{self.owner}: rendering the prompt failed: {said}")


def _plain_substitutions(
    parsed: nodes.Template, params: set[str]
) -> tuple[tuple[bool, str], ...] | None:
    """The template as (is_parameter, text-or-name) pieces, if it is nothing but text and
    ``{{ name }}`` of parameters; ``None`` when it uses anything else (filters, tags, ...)."""
    pieces: list[tuple[bool, str]] = []
    for node in parsed.body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                pieces.append((False, child.data))
            elif isinstance(child, nodes.Name) and child.ctx == "load" and child.name in params:
                pieces.append((True, child.name))
            else:
                return None
    return tuple(pieces)


def warn_if_body_has_code(fn: Callable[..., Any], kind: str = "agent") -> None:
    """An agent's body never runs: warn once, at decoration, if it holds code meant to."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, ValueError, SyntaxError, tokenize.TokenError):
        # No source (a REPL), or not the function's: code run with exec() under the name of a
        # file that holds something else (a README's examples), which Python 3.13's tokenizer
        # refuses with a TokenError. Nothing to check either way.
        return
    func = tree.body[0] if tree.body else None
    if not isinstance(func, ast.AsyncFunctionDef | ast.FunctionDef):
        return
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    ignored = [stmt for stmt in body if not _is_placeholder(stmt)]
    if ignored:
        lineno = fn.__code__.co_firstlineno + ignored[0].lineno - 1
        # warn_explicit points at the ignored code itself, whichever way the decorator was applied.
        warnings.warn_explicit(
            f"{kind} {fn.__qualname__!r}: its body is never executed (the docstring is the "
            f"prompt); the code from line {lineno} on is ignored",
            UserWarning,
            fn.__code__.co_filename,
            lineno,
        )


def _is_placeholder(stmt: ast.stmt) -> bool:
    """Whether ``stmt`` only stands in for a body that never runs: ``pass``, ``...`` (or
    another constant), or ``raise NotImplementedError`` with or without a message, which the
    README recommends so that mypy and pyright accept the agent's return type."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr):
        return isinstance(stmt.value, ast.Constant)
    if not isinstance(stmt, ast.Raise) or stmt.cause is not None:
        return False
    raised = stmt.exc
    if isinstance(raised, ast.Call):
        if raised.keywords or not all(
            isinstance(arg, ast.Constant | ast.JoinedStr) for arg in raised.args
        ):
            return False
        raised = raised.func
    return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"
