"""Typed results: from an agent's return annotation to a JSON schema, and from text back to a value.

pydantic does the schema and the validation. What pydantic cannot do is find the JSON in a chatty
model's answer, so :func:`json_candidates` does that: fenced blocks first, then balanced ``{...}``
or ``[...]`` spans, then the whole text. What is found is validated as JSON (pydantic's JSON
mode), as the schema describes it: a strict type takes a date as its ISO string, a tuple as an
array.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

import pydantic
import pydantic_core
from pydantic import TypeAdapter
from typing_extensions import is_typeddict  # pydantic's dependency

from .errors import UsageError
from .providers import Model, ModelRequest, OutputSchema

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class OutputValidationError(ValueError):
    """The text did not yield a valid value; the message is what the model is told on re-ask."""


def _is_object_type(tp: Any) -> bool:
    """Types whose JSON schema is an object at the top level (no wrapping needed)."""
    if isinstance(tp, type):
        if issubclass(tp, pydantic.BaseModel) or dataclasses.is_dataclass(tp):
            return True
        if is_typeddict(tp):  # typing's and typing_extensions' (which pydantic needs on 3.11)
            return True
    return False


def _choices(tp: Any) -> list[Any] | None:
    """The allowed values of a Literal or Enum (possibly ``| None``), for lenient matching."""
    origin = get_origin(tp)
    if origin is Literal:
        return list(get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.value for m in tp]
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _choices(args[0])
    return None


class OutputSpec:
    """How to ask for, and read back, one return type."""

    __slots__ = (
        "_adapter",
        "_choices",
        "_has_result_field",
        "_wrapped_adapter",
        "instructions",
        "is_text",
        "schema",
        "type",
        "wrapped",
    )

    def __init__(self, tp: Any) -> None:
        self.type: Any = tp
        self.is_text: bool = tp is str or tp is Any or tp is None
        self.wrapped: bool = False
        self.schema: OutputSchema | None = None
        self._choices: list[Any] | None = None
        self._has_result_field = False
        #: The sentence appended to the prompt so the model knows the shape wanted.
        self.instructions: str = ""
        if self.is_text:
            return
        try:
            self._adapter: TypeAdapter[Any] = TypeAdapter(tp)
            inner = self._adapter.json_schema()
        except (
            pydantic.PydanticSchemaGenerationError,
            pydantic.PydanticUserError,
            # pydantic's own check of what it built: a pattern its regex engine lacks (a
            # look-around, a back-reference), say.
            pydantic_core.SchemaError,
            # A value the schema shows that has no JSON form: an Enum's object() values.
            pydantic_core.PydanticSerializationError,
        ) as exc:
            raise UsageError(
                f"return type {tp!r} cannot be used as an agent result: {exc}"
            ) from exc
        except RecursionError as exc:
            raise UsageError(
                f"return type {tp!r} cannot be used as an agent result: its models nest deeper "
                f"than pydantic can make a JSON schema of; flatten them"
            ) from exc
        unreadable = _unreadable_choice(self._adapter)
        if unreadable is not None:
            choice, text = unreadable
            raise UsageError(
                f"return type {tp!r} cannot be used as an agent result: the model would answer "
                f"its choice {choice!r} as the JSON {text}, which does not read back as "
                f"{choice!r}, so that answer could never be taken; give its Literal or Enum "
                f"values that JSON keeps (str, int, float, bool or None)"
            )
        self._choices = _choices(tp)
        self._has_result_field = "result" in inner.get("properties", {})
        # Structured-output APIs want an object at the top level, so other types are wrapped.
        if _is_object_type(tp):
            self.schema = OutputSchema(getattr(tp, "__name__", "Result"), inner)
        else:
            self.wrapped = True
            defs = inner.pop("$defs", None)
            schema: dict[str, Any] = {
                "type": "object",
                "properties": {"result": inner},
                "required": ["result"],
            }
            if defs:
                schema["$defs"] = defs
            self.schema = OutputSchema("Result", schema)
        compact = json.dumps(self.schema.schema, separators=(",", ":"))
        self.instructions = (
            f"\n\nAnswer with only a JSON value that follows this JSON schema: {compact}"
        )

    def dump(self, value: Any, owner: str = "the agent") -> str:
        """JSON for the journal of durable runs, where a resumed run reads the value back in
        place of the call: checked to read back as this very value. Some values do not (a
        ``SecretStr`` is written masked, a field with ``exclude=True`` not at all, a validator
        that changes a value changes it again when read back); journaled anyway, they would
        turn into other values, or into an error, only once the run is resumed. Raises
        :class:`~kagura.errors.UsageError` for those, naming ``owner``."""
        text: str = pydantic_core.to_json(value, fallback=repr).decode()
        if self.is_text:
            return text
        try:
            differs = self._adapter.validate_json(text) != value
            why = "it reads back as another value"
        except pydantic.ValidationError as exc:
            differs = True
            why = f"it does not read back ({describe_error(exc)})"
        if differs:
            raise UsageError(
                f"{owner}: its result cannot be journaled: written as JSON, {why}. A durable "
                f"run replays each result from the journal when it is resumed: give the return "
                f"type only fields that JSON keeps (no SecretStr, no exclude=True) and "
                f"validators that leave a valid value as it is, or make this call outside a "
                f"durable run"
            )
        return text

    def load(self, text: str | None) -> Any:
        """A journaled value back as the return type."""
        if text is None:
            return None
        if self.is_text:
            return json.loads(text)
        return self._adapter.validate_json(text)

    def parse(self, text: str) -> Any:
        """The value of this type read from the model's answer ``text``; raises
        :class:`OutputValidationError` when none is found that validates."""
        if self.is_text:
            return text.strip()
        last_error: Exception | None = None
        for candidate in json_candidates(text):
            try:
                data = json.loads(candidate)
            except ValueError as exc:
                last_error = exc
                continue
            except RecursionError:  # json.loads recurses as deep as the arrays nest
                last_error = ValueError("its arrays or objects nest too deeply")
                continue
            for reading, value in enumerate(self._unwrap(data)):
                try:
                    # Written back as JSON to be validated as JSON: in Python mode a strict type
                    # refuses the JSON forms its schema asks for (a datetime's string).
                    return self._finite(self._adapter.validate_json(pydantic_core.to_json(value)))
                except ValueError as exc:  # pydantic's ValidationError among them
                    if reading == 0:
                        # What is wrong with its likeliest reading is what the model is told:
                        # of {"result": NaN}, that NaN is no number, not that an object is none.
                        last_error = exc
        lenient = self._lenient(text)
        if lenient is not _MISSING:
            return lenient
        if last_error is None:
            raise OutputValidationError("the answer contains no JSON value")
        raise OutputValidationError(describe_error(last_error))

    @staticmethod
    def _finite(value: Any) -> Any:
        """``value``, unless a float in it is NaN or infinite: JSON has no such number (the
        schema asks for JSON), so a model that answers ``NaN`` (or ``"NaN"``, which pydantic
        reads as a float) found no number, and is asked again rather than have NaN flow into
        the caller's arithmetic. Nor could the journal of a durable run keep it: JSON again."""
        try:
            data = pydantic_core.to_jsonable_python(value, fallback=repr)
        except ValueError:
            return value  # not all of it has a JSON form: no float to find in that part
        stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
        while stack:
            loc, item = stack.pop()
            if isinstance(item, float) and not math.isfinite(item):
                where = ".".join(str(x) for x in loc) or "value"
                raise OutputValidationError(f"{where}: Input should be a finite number, not {item}")
            if isinstance(item, dict):
                stack.extend(((*loc, k), v) for k, v in item.items())
            elif isinstance(item, list):
                stack.extend(((*loc, i), v) for i, v in enumerate(item))
        return value

    def _unwrap(self, data: Any) -> list[Any]:
        if self.wrapped and isinstance(data, dict) and "result" in data:
            return [data["result"], data]
        if isinstance(data, dict) and len(data) == 1 and "result" in data:
            # An object type that the model wrapped anyway, as it was told to wrap scalars:
            # what it wrapped first, since the wrapper itself is a valid value of a type whose
            # fields all have defaults (its one key ignored), unless "result" is a field.
            if self._has_result_field:
                return [data, data["result"]]
            return [data["result"], data]
        return [data]

    def _lenient(self, text: str) -> Any:
        """Scalars from plain text: ``"42"``, ``"true"``, ``"Positive."`` for a Literal."""
        stripped = text.strip().strip("`").strip()
        for candidate in (stripped, stripped.rstrip(".!").strip().strip("\"'")):
            try:
                value = self._adapter.validate_strings(candidate)
            except (TypeError, ValueError):  # pydantic's ValidationError among them
                continue
            return self._finite(value)  # "nan" is a float to pydantic, but no number
        if self._choices is not None:
            choice = _choice_in_prose(stripped, self._choices)
            return _MISSING if choice is _MISSING else self._adapter.validate_python(choice)
        if self.type in (int, float):
            numbers = _NUMBER.findall(stripped)
            if len(numbers) == 1:
                try:
                    return self._finite(self._adapter.validate_strings(numbers[0]))
                except pydantic.ValidationError:
                    pass
        return _MISSING

    def validate_partial(self, data: Any) -> Any:
        """The value of an answer still arriving, from its partial JSON ``data`` (as
        ``pydantic_core.from_json(text, allow_partial="trailing-strings")`` reads it), validated
        with pydantic's partial validation: a string still arriving counts as far as it has
        come. Raises :class:`OutputValidationError` while it is no valid value yet."""
        if self.wrapped:
            if not isinstance(data, dict) or "result" not in data:
                raise OutputValidationError("no result yet")
            data = data["result"]
        try:
            return self._adapter.validate_python(
                data, experimental_allow_partial="trailing-strings"
            )
        except pydantic.ValidationError as exc:
            raise OutputValidationError(describe_error(exc)) from None


_MISSING: Any = object()


def _unreadable_choice(adapter: TypeAdapter[Any]) -> tuple[Any, str] | None:
    """A Literal's or an Enum's value in ``adapter``'s type that its JSON (as the schema offers
    it to the model) does not read back as, with that JSON: a tuple (JSON has arrays, read as
    lists), bytes (JSON has strings), a date. Found in pydantic's core schema, where each
    Literal and Enum is a node of its own, however deep in models and unions."""
    seen: set[int] = set()
    stack: list[Any] = [adapter.core_schema]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            kind = node.get("type")
            if kind in ("literal", "enum"):
                validator = pydantic_core.SchemaValidator(node)
                for choice in node["expected"] if kind == "literal" else node["members"]:
                    try:
                        text = pydantic_core.to_json(choice).decode()
                    except ValueError:
                        continue  # no JSON at all: its JSON schema could not be made either
                    try:
                        validator.validate_json(text)
                    except pydantic.ValidationError:
                        return choice, text
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return None


_WORD = re.compile(r"[\w'’-]+")
#: Words that turn a choice named in prose around: "not positive", "isn't negative".
_NEGATIONS = frozenset({"not", "no", "never", "neither", "nor", "none"})


def _choice_in_prose(text: str, choices: list[Any]) -> Any:
    """The one choice (a Literal's or an Enum's text value) that ``text`` names as a whole word
    or words, in any case: ``"The sentiment is NEGATIVE!"`` names ``"negative"``. Not when it
    names several, when the choice is only part of a word (``"no"`` in ``"know"``, ``"negative"``
    in ``"non-negative"``), or when a negation may turn it around (``"not positive"``): the
    model is then asked again rather than guessed at."""
    words = [w.lower() for w in _WORD.findall(text)]
    named = {
        choice: wanted
        for choice in choices
        if isinstance(choice, str)
        and (wanted := [w.lower() for w in _WORD.findall(choice)])
        and _within(wanted, words)
    }
    # "not sure" names "sure" too: the longer choice is the one named.
    named = {
        c: w
        for c, w in named.items()
        if not any(o != c and _within(w, ow) for o, ow in named.items())
    }
    if len(named) != 1:
        return _MISSING
    ((choice, named_words),) = named.items()
    for word in words:
        if word not in named_words and (word in _NEGATIONS or word.endswith(("n't", "n’t"))):
            return _MISSING
    return choice


def _within(part: list[str], words: list[str]) -> bool:
    """Whether ``part`` occurs in ``words`` as consecutive words."""
    n = len(part)
    return any(words[i : i + n] == part for i in range(len(words) - n + 1))


def describe_error(error: Exception) -> str:
    """A validation error in a line: where, and what was wrong (at most five places)."""
    if isinstance(error, OutputValidationError):
        return str(error)
    if isinstance(error, pydantic.ValidationError):
        parts = []
        for e in error.errors(include_url=False)[:5]:
            loc = ".".join(str(x) for x in e["loc"]) or "value"
            parts.append(f"{loc}: {e['msg']}")
        return "; ".join(parts)
    return f"invalid JSON: {error}"


def json_candidates(text: str) -> list[str]:
    """Substrings of ``text`` that may be JSON values, most likely first."""
    found: list[str] = [m.group(1).strip() for m in _FENCE.finditer(text)]
    found.extend(_balanced_spans(text))
    stripped = text.strip()
    if stripped and stripped not in found:
        found.append(stripped)
    return found


def _balanced_spans(text: str) -> list[str]:
    """Top-level ``{...}`` and ``[...]`` spans, honouring strings and escapes."""
    spans: list[str] = []
    depth = 0
    start = -1
    in_string = False
    escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"' and depth > 0:
            in_string = True
        elif ch in "{[":
            if depth == 0:
                start = i
            depth += 1
        elif ch in "}]" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    return spans


def cut_off(request: ModelRequest, model: Model) -> str:
    """What an OutputParseError says of an answer that the output limit cut short: never a
    typed result (at best a prefix of the right one), and not asked again (the same limit would
    cut it short again)."""
    if request.max_tokens is not None:
        limit = f"max_tokens={request.max_tokens}"
    elif model.default_max_tokens is not None:
        limit = f"max_tokens={model.default_max_tokens} ({model.id}'s default)"
    else:
        limit = "the server's default output limit (max_tokens is not set)"
    return (
        f"the answer was cut off by {limit} before it was complete (finish_reason 'length'); "
        f"give the agent more room with @agent(max_tokens=...), or ask for a shorter answer"
    )
