"""The sandbox prompts render in: Jinja2's, bounding what a prompt may make.

Arguments may carry user-controlled objects and sizes (a width, a separator, a count): rendering
one prompt must not run the process out of memory. :class:`_Sandbox` says what is bounded where.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import re
import types
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache, update_wrapper
from typing import Any

from jinja2 import (
    Environment,
    StrictUndefined,
    pass_environment,
    pass_eval_context,
)
from jinja2 import filters as jinja_filters
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.sandbox import SandboxedEnvironment, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum

#: The most characters (or items) one operation of a prompt may add, and the most bits a ``**``
#: of whole numbers may make: beyond, an argument such as a width, a separator or a count
#: would have the process run out of memory (or time) rendering one prompt. What is added, not
#: the result, is bounded, so that a long document may still be indented, wrapped or written as
#: it is. :class:`_Sandbox` says where each is checked.
MOST_REPEATED = 1_000_000
MOST_BITS = 1_000_000

#: The most characters a prompt may be, written however it is (a loop writing an argument over
#: and over, say): more than any model reads (at about four characters a token, the longest
#: contexts hold a few million characters), and few enough to build in memory.
MOST_WRITTEN = 50_000_000


def _refuse_beyond(added: int, what: str) -> None:
    if added > MOST_REPEATED:
        raise SecurityError(
            f"{what} would add {added:,} characters or items, more than the "
            f"{MOST_REPEATED:,} a prompt may make"
        )


class _Sandbox(SandboxedEnvironment):
    """Jinja2's sandbox (arguments may carry user-controlled objects), bounding what a prompt
    makes as it bounds ``range``, in two places:

    - What the template writes (:meth:`concat`): the prompt, and the text of a ``{% set %}``,
      macro, call or filter block, each counted as it is written and refused past
      :data:`MOST_WRITTEN` characters. That stops a loop that writes an argument too many
      times, however each piece was made.
    - Each value built in one expression, before it is built (it may be too big to build, or
      never written, only measured): ``*`` and ``**`` (:meth:`call_binop`), ``%`` formats,
      ``str.format`` (:meth:`wrap_str_format`), the string methods (of ``Markup`` too,
      :meth:`call`), filters and globals that repeat what an argument gives them: a width, a
      separator, a count, or the same string or list given many times over (``[text] * n``,
      :func:`_repeated`). Each may add up to :data:`MOST_REPEATED` characters or items."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters.update(_BOUNDED_FILTERS)
        self.globals["lipsum"] = _lipsum

    def concat(self, parts: Iterable[str]) -> str:
        """What Jinja joins the pieces the template writes with, counting them as they come."""
        written: list[str] = []
        length = 0
        for part in parts:
            written.append(part)
            length += len(part)
            if length > MOST_WRITTEN:
                raise SecurityError(
                    f"the template writes {length:,} characters or more, more than the "
                    f"{MOST_WRITTEN:,} a prompt may hold (more than any model reads)"
                )
        return "".join(written)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            # n * "ab" or "ab" * n
            sequence, times = (
                (right, _count(left)) if _count(right) is None else (left, _count(right))
            )
            if isinstance(sequence, str | bytes | bytearray | list | tuple) and times is not None:
                size = _size(sequence)
                if size * times > MOST_REPEATED:
                    raise SecurityError(
                        f"{size} items repeated {times} times is more than the "
                        f"{MOST_REPEATED:,} a prompt may make"
                    )
        elif operator == "%":
            if isinstance(left, str | bytes | bytearray):
                _refuse_beyond(_percent_added(left, right), "a '%' format")
        elif (
            isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and abs(left) > 1
            and right * math.log2(abs(left)) > MOST_BITS
        ):
            raise SecurityError(f"{left} ** {right} has more than the {MOST_BITS:,} bits allowed")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # Named as Jinja names them, so that no keyword a template passes clashes with them.
        # Markup's methods are Python methods, str's and bytes' built-in ones.
        if isinstance(__obj, types.BuiltinMethodType | types.MethodType) and isinstance(
            __obj.__self__, str | bytes | bytearray
        ):
            method = __obj.__name__
            if method == "join" and len(args) == 1 and not kwargs:
                args = (list(args[0]),)  # counted here, then joined: an iterator only once
            added = _METHOD_ADDS.get(method)
            if added is not None:
                try:
                    count = added(__obj.__self__, *args, **kwargs)
                except (TypeError, ValueError):
                    count = 0  # arguments the method refuses itself, with its own message
                _refuse_beyond(count, f"str.{method}()")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formats = super().wrap_str_format(value)
        if formats is None:
            return None
        template: str = value.__self__
        by_map = value.__name__ == "format_map"
        sandbox = self

        def bounded(*args: Any, **kwargs: Any) -> str:
            if not by_map:
                _Widths(sandbox).check(template, args, kwargs)
            elif len(args) == 1 and not kwargs:  # else Jinja's wrapper says what is wrong
                _Widths(sandbox).check(template, (), args[0])
            return formats(*args, **kwargs)

        return update_wrapper(bounded, value)


class _Widths(SandboxedFormatter):
    """A run of ``str.format`` ahead of Jinja's: the widths and precisions its fields ask for,
    counted before a field that asks too much is built, and the fields that format an object
    again (``'{0}{0}'``, or the same string given twice), each looked up as the sandbox does."""

    def check(self, template: str, args: Any, kwargs: Any) -> None:
        self.added = 0
        self.formatted: dict[int, Any] = {}  # by id, holding each so that no id is reused
        self.vformat(template, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> str:
        match = _FORMAT_SPEC.match(format_spec)
        if match:
            self.added += max(int(match["width"] or 0), int(match["precision"] or 0))
            _refuse_beyond(self.added, "str.format()")
        # Formatted, within the bound, because a field may give a width to another.
        field = str(super().format_field(value, format_spec))
        if id(value) in self.formatted:
            self.added += len(field)
            _refuse_beyond(self.added, "str.format()")
        self.formatted[id(value)] = value
        return field


#: A format spec's width and precision (Python's format-spec mini-language).
_FORMAT_SPEC = re.compile(
    r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d*))?[a-zA-Z%]?\Z",
    re.DOTALL,
)
#: A printf-style ``%`` conversion after its ``%`` and its ``(key)``.
_PERCENT = re.compile(
    r"[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d*))?[hlL]?(?P<type>.)", re.DOTALL
)


def _percent_conversions(template: str) -> Iterator[tuple[str | None, re.Match[str]]]:
    """The key (``None`` if none) and the rest of each conversion of the ``%`` format
    ``template``, read as Python reads them: a key ends at the ``)`` that balances its ``(``."""
    start = template.find("%")
    while start != -1:
        start += 1
        key = None
        if template.startswith("(", start):
            depth = 0
            for end in range(start, len(template)):
                depth += {"(": 1, ")": -1}.get(template[end], 0)
                if depth == 0:
                    break
            else:
                return  # unbalanced: Python refuses the format itself
            key, start = template[start + 1 : end], end + 1
        conversion = _PERCENT.match(template, start)
        if conversion is None:
            return  # a '%' at the end: likewise
        yield key, conversion
        start = template.find("%", conversion.end())


def _percent_added(template: str | bytes | bytearray, values: Any) -> int:
    """What the ``%`` format ``template`` adds: its widths and precisions, a ``*`` one taken
    from ``values`` as Python takes it, and the strings and lists it formats again."""
    if isinstance(template, bytes | bytearray):
        template = template.decode("latin-1")  # one character a byte: the same conversions
    args = values if isinstance(values, tuple) else (values,)
    position = 0
    added = 0
    formatted: list[Any] = []
    for key, conversion in _percent_conversions(template):
        for part in (conversion["width"], conversion["precision"]):
            if part == "*":
                given = args[position] if position < len(args) else 0
                position += 1
                added += abs(given) if isinstance(given, int) else 0
            elif part:
                added += int(part)
        if conversion["type"] == "%":
            continue
        if key is None:
            formatted.extend(args[position : position + 1])
            position += 1
        else:
            with contextlib.suppress(Exception):  # Python says what is wrong when it formats
                formatted.append(values[key])
    return added + _repeated(formatted)


def _size(sequence: str | bytes | bytearray | list[Any] | tuple[Any, ...]) -> int:
    """A string's characters, or a list's items and the strings' and lists' among them:
    ``[text] * n`` is written as ``n`` texts."""
    if isinstance(sequence, str | bytes | bytearray):
        return len(sequence)
    return len(sequence) + sum(
        len(item) for item in sequence if isinstance(item, str | bytes | list | tuple)
    )


def _repeated(items: list[Any]) -> int:
    """The length of the strings and lists among ``items`` that are the same object again:
    what joining them adds beyond what the arguments already hold (``[text] * n``)."""
    total = distinct = 0
    seen: set[int] = set()
    for item in items:
        if isinstance(item, str | bytes | list | tuple):
            total += len(item)
            if id(item) not in seen:
                seen.add(id(item))
                distinct += len(item)
    return total - distinct


def _joined(separator: Any, items: list[Any]) -> int:
    return len(separator) * max(len(items) - 1, 0) + _repeated(items)


def _replaced(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    found = text.count(old) if len(old) else len(text) + 1
    if count is not None and count >= 0:
        found = min(found, count)
    return int(found * max(len(new) - len(old), 0))


def _padded(text: Any, width: Any, *fill: Any) -> int:
    return max(operator.index(width) - len(text), 0)


def _tabs(text: Any, tabsize: Any = 8) -> int:
    return int(text.count("\t" if isinstance(text, str) else b"\t") * operator.index(tabsize))


def _translated(text: Any, table: Any) -> int:
    longest = max(
        (len(v) for v in table.values() if isinstance(v, str | bytes))
        if isinstance(table, dict)
        else (),
        default=1,
    )
    return len(text) * (longest - 1)


#: What each string method that can repeat what it is given adds, from its arguments.
_METHOD_ADDS: dict[str, Callable[..., int]] = {
    "center": _padded,
    "ljust": _padded,
    "rjust": _padded,
    "zfill": _padded,
    "expandtabs": _tabs,
    "replace": _replaced,
    "join": _joined,
    "translate": _translated,
}


# The filters of Jinja's that can repeat what an argument gives them: each counts what it
# would add, then calls Jinja's own (the sync one: prompts render synchronously).


def _center(value: Any, width: int = 80) -> str:
    _refuse_beyond(_padded(str(value), width), "center")
    return jinja_filters.do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    indent = len(width) if isinstance(width, str) else operator.index(width)
    _refuse_beyond(indent * (str(s).count("\n") + 1), "indent")
    return jinja_filters.do_indent(s, width, first, blank)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    _refuse_beyond(_percent_added(str(value), kwargs or args), "format")
    return jinja_filters.do_format(value, *args, **kwargs)


@pass_eval_context
def _replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    _refuse_beyond(_replaced(str(s), str(old), str(new), count), "replace")
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


def _items(
    environment: Environment, value: Iterable[Any], attribute: str | int | None
) -> list[Any]:
    """The items a filter given ``attribute`` works on, looked up as Jinja does, in a list to
    be counted, then used: an iterator can be read once."""
    if attribute is not None:
        value = map(jinja_filters.make_attrgetter(environment, attribute), value)
    return list(value)


@pass_eval_context
def _join(
    eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None
) -> str:
    items = _items(eval_ctx.environment, value, attribute)
    _refuse_beyond(_joined(d, items), "join")
    return jinja_filters.sync_do_join(eval_ctx, items, d)


@pass_environment
def _sum(
    environment: Environment,
    iterable: Iterable[Any],
    attribute: str | int | None = None,
    start: Any = 0,
) -> Any:
    items = _items(environment, iterable, attribute)
    if isinstance(start, list | tuple):
        _refuse_beyond(_repeated(items), "sum")
        if type(start) in (list, tuple) and all(type(item) is type(start) for item in items):
            # What sum() makes, without the copy of all so far it makes for each item.
            return type(start)(itertools.chain(start, *items))
    return jinja_filters.sync_do_sum(environment, items, start=start)


@pass_environment
def _wordwrap(
    environment: Environment,
    s: str,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    text = str(s)
    # A line ends at a word, at a hyphen, inside a word longer than the width, or where the
    # text had one.
    lines = len(text.split()) + text.count("-") + len(text) // max(width, 1) + text.count("\n")
    separator = environment.newline_sequence if wrapstring is None else wrapstring
    _refuse_beyond(len(separator) * (lines + 1), "wordwrap")
    return jinja_filters.do_wordwrap(
        environment, s, width, break_long_words, wrapstring, break_on_hyphens
    )


@pass_eval_context
def _urlize(
    eval_ctx: EvalContext,
    value: str,
    trim_url_limit: int | None = None,
    nofollow: bool = False,
    target: str | None = None,
    rel: str | None = None,
    extra_schemes: Iterable[str] | None = None,
) -> str:
    per_link = len(target or "") + len(rel or "")
    _refuse_beyond(per_link * len(str(value).split()), "urlize")
    return jinja_filters.do_urlize(
        eval_ctx, value, trim_url_limit, nofollow, target, rel, extra_schemes
    )


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
    if fill_with is not None:  # the last batch is filled up to linecount
        _refuse_beyond(operator.index(linecount), "batch")
    return jinja_filters.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    _refuse_beyond(operator.index(slices), "slice")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


@pass_eval_context
def _tojson(eval_ctx: EvalContext, value: Any, indent: int | str | None = None) -> Any:
    if indent is not None:
        _refuse_beyond(_indented(value, indent), "tojson")
    return jinja_filters.do_tojson(eval_ctx, value, indent)  # type: ignore[arg-type]


def _indented(value: Any, indent: int | str) -> int:
    """What ``indent`` adds to the JSON of ``value``: a line per item, indented by its depth;
    counted by walking the lists and dicts, and given up once it is too much (a list may hold
    one big list many times over)."""
    width = len(indent) if isinstance(indent, str) else operator.index(indent)
    added = width
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if not isinstance(item, dict | list | tuple):
            continue
        for child in children:
            added += 1 + width * depth
            if added > MOST_REPEATED:
                return added
            stack.append((child, depth + 1))
        added += 1 + width * (depth - 1)  # the closing bracket's line
    return added


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    # A paragraph has fewer than max words (min > max is refused by Jinja's own), each at most
    # the longest of its lorem ipsum (12 letters) with a comma and a space, and <p> and </p>.
    _refuse_beyond(operator.index(n) * (operator.index(max) * 14 + 9), "lipsum")
    return generate_lorem_ipsum(n, html, min, max)


_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "batch": _batch,
    "center": _center,
    "format": _format,
    "indent": _indent,
    "join": _join,
    "replace": _replace,
    "slice": _slice,
    "sum": _sum,
    "tojson": _tojson,
    "urlize": _urlize,
    "wordwrap": _wordwrap,
}


def _count(value: Any) -> int | None:
    """``value`` as a whole number a sequence can be repeated by (a NumPy integer too)."""
    if isinstance(value, bool | str | bytes | bytearray | list | tuple):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


@lru_cache(maxsize=1)
def environment() -> SandboxedEnvironment:
    # StrictUndefined so a typo fails loudly instead of rendering as an empty string.
    return _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
