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
import functools
import json
import math
import re
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import pydantic
import pydantic_core
from pydantic import TypeAdapter
from pydantic.types import AllowInfNan
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
        "_inf_nan_allowed",
        "_result_validator",
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
        self._inf_nan_allowed = False
        self._result_validator: pydantic_core.SchemaValidator | None = None
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
        self._inf_nan_allowed = _allows_inf_nan(self._adapter)
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
            for reading, in_result in enumerate(self._readings(data)):
                try:
                    return self._finite(self._validate(candidate, data, in_result))
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

    def _validate(self, candidate: str, data: Any, in_result: bool) -> Any:
        """The value of the JSON text ``candidate`` (``data``, as json.loads reads it), or with
        ``in_result`` of its ``"result"``, validated as the JSON text it is (pydantic's JSON
        mode): in Python mode a strict type refuses the JSON forms its schema asks for (a
        datetime's string)."""
        try:
            if in_result:
                return self._result().validate_json(candidate)["result"]
            return self._adapter.validate_json(candidate)
        except pydantic.ValidationError as exc:
            if not (not_json(exc) and lone_surrogate_in(data)):
                if in_result:  # told where in the result, as when the result is the answer
                    raise OutputValidationError(describe_error(exc, within=1)) from None
                raise
        # Half a character: a string escaping a lone surrogate ("\ud83d", as small models
        # write when they cut an emoji in two), which pydantic's JSON reader refuses. Taken
        # as json.loads reads it, and validated as that value, as every answer was before
        # answers were validated as JSON.
        return self._adapter.validate_python(data["result"] if in_result else data)

    def _result(self) -> pydantic_core.SchemaValidator:
        """A validator of ``{"result": <this type>}`` (other keys ignored), to validate the
        ``"result"`` of an answer's JSON text without writing it out again. Made when first
        needed, from the type's own core schema: most answers are not wrapped in one."""
        if self._result_validator is None:
            schema = pydantic_core.core_schema.typed_dict_schema(
                {"result": pydantic_core.core_schema.typed_dict_field(self._adapter.core_schema)}
            )
            self._result_validator = pydantic_core.SchemaValidator(schema)
        return self._result_validator

    def _finite(self, value: Any) -> Any:
        """``value``, unless it holds a float that is NaN or infinite that the answer gave (a
        ``NaN`` or ``1e999`` in its JSON, or a ``"NaN"`` pydantic reads as a float): JSON has no
        such number (the schema asks for JSON), so a model that answers ``NaN`` found no number,
        and is asked again rather than have NaN flow into the caller's arithmetic; nor could the
        journal of a durable run keep it. Unless the type allows them (``allow_inf_nan=True``
        in its config or a field's): then they are the caller's to have, as pydantic decides.
        Looked for in what validation made of the answer, not in its JSON form: a computed
        field, a serializer or a default is not the answer's, and none of them is run."""
        if self._inf_nan_allowed:
            return value
        found = _non_finite(value)
        if found is not None:
            loc, number = found
            where = ".".join(str(x) for x in loc) or "value"
            raise OutputValidationError(f"{where}: Input should be a finite number, not {number}")
        return value

    def _readings(self, data: Any) -> list[bool]:
        """The ways to read the answer's JSON ``data``, likeliest first: as its ``"result"``
        (True) or as it is (False)."""
        if self.wrapped and isinstance(data, dict) and "result" in data:
            return [True, False]
        if isinstance(data, dict) and len(data) == 1 and "result" in data:
            # An object type that the model wrapped anyway, as it was told to wrap scalars:
            # what it wrapped first, since the wrapper itself is a valid value of a type whose
            # fields all have defaults (its one key ignored), unless "result" is a field.
            if self._has_result_field:
                return [False, True]
            return [True, False]
        return [False]

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

    def validate_partial(self, text: str) -> Any:
        """The value of an answer still arriving, from its JSON ``text`` so far, validated as
        the final answer is (as JSON, non-finite numbers refused), with pydantic's partial
        validation: a string still arriving counts as far as it has come. Raises
        :class:`OutputValidationError` while it is no valid value yet."""
        try:
            if self.wrapped:
                value = self._result().validate_json(text, allow_partial="trailing-strings")
                value = value["result"]
            else:
                value = self._adapter.validate_json(
                    text, experimental_allow_partial="trailing-strings"
                )
        except pydantic.ValidationError as exc:
            raise OutputValidationError(describe_error(exc)) from None
        return self._finite(value)


_MISSING: Any = object()


#: The keys of a node of pydantic's core schema that hold nodes of it: a field's schema, a
#: list's items', a union's choices. Not its default, its examples or other metadata, nor how it
#: is serialized: values there are the user's, and may look like nodes (a default of
#: ``{"type": "enum"}``) without being any.
_SUBSCHEMA_KEYS = (
    "schema",
    "items_schema",
    "keys_schema",
    "values_schema",
    "extras_schema",
    "extras_keys_schema",
    "choices",
    "fields",
    "definitions",
    "steps",
    "json_schema",
    "python_schema",
    "lax_schema",
    "strict_schema",
    "arguments_schema",
    "var_args_schema",
    "var_kwargs_schema",
    "return_schema",
)


def _schema_nodes(schema: Any, *, into_models: bool = True) -> Iterator[dict[str, Any]]:
    """The nodes of pydantic's core ``schema``, however deep in models and unions (or, without
    ``into_models``, up to its models and dataclasses): what it validates with. (pydantic keeps
    its own walk of them private.)"""
    seen: set[int] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list | tuple):  # a list of nodes, or a union's (node, label)
            stack.extend(node)
            continue
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if not into_models and node.get("type") in ("model", "dataclass"):
            continue
        for key in _SUBSCHEMA_KEYS:
            sub = node.get(key)
            if key in ("fields", "choices") and isinstance(sub, dict):
                stack.extend(sub.values())  # by name (a model's fields), or by tag
            elif sub is not None:
                stack.append(sub)


def _unreadable_choice(adapter: TypeAdapter[Any]) -> tuple[Any, str] | None:
    """A Literal's or an Enum's value in ``adapter``'s type that its JSON (as the schema offers
    it to the model) does not read back as, with that JSON: a tuple (JSON has arrays, read as
    lists), bytes (JSON has strings), a date. Found in pydantic's core schema, where each
    Literal and Enum is a node of its own, however deep in models and unions."""
    for node in _schema_nodes(adapter.core_schema):
        kind = node.get("type")
        if kind not in ("literal", "enum"):
            continue
        try:
            validator = pydantic_core.SchemaValidator(node)
            choices = node["expected"] if kind == "literal" else node["members"]
        except (pydantic_core.SchemaError, KeyError, TypeError):
            # Not the node it looked like: this check is no reason to refuse the type.
            continue
        for choice in choices:
            try:
                text = pydantic_core.to_json(choice).decode()
            except ValueError:
                continue  # no JSON at all: its JSON schema could not be made either
            try:
                validator.validate_json(text)
            except pydantic.ValidationError:
                return choice, text
    return None


def _allows_inf_nan(adapter: TypeAdapter[Any]) -> bool:
    """Whether ``adapter``'s type, outside its models and dataclasses, says that NaN and
    infinities are values of it: ``allow_inf_nan=True`` on it, or its config's (pydantic's
    default, True, says nothing of the kind). Models and pydantic dataclasses say so for their
    own fields (:func:`_inf_nan_fields`)."""
    for node in _schema_nodes(adapter.core_schema, into_models=False):
        config = node.get("config")
        if node.get("allow_inf_nan") is True or (
            isinstance(config, dict) and config.get("allow_inf_nan") is True
        ):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _inf_nan_fields(cls: type) -> frozenset[str]:
    """The fields of a model or pydantic dataclass ``cls`` that take NaN and infinities: those
    its config allows them in (``allow_inf_nan=True``) but for a field that says otherwise, and
    those that say so themselves (``Field(allow_inf_nan=True)``, ``AllowInfNan()``)."""
    fields = getattr(cls, "__pydantic_fields__", None)
    if not isinstance(fields, dict):
        return frozenset()  # a plain dataclass: no config, no field says
    config = getattr(cls, "model_config", None) or getattr(cls, "__pydantic_config__", None)
    by_config = isinstance(config, dict) and config.get("allow_inf_nan") is True
    allowed = set()
    for name, info in fields.items():
        said = [m.allow_inf_nan for m in info.metadata if isinstance(m, AllowInfNan)]
        if said[-1] if said else by_config:
            allowed.add(name)
    return frozenset(allowed)


def _non_finite(value: Any) -> tuple[tuple[Any, ...], float] | None:
    """Where in the validated ``value`` a NaN or an infinity is, and which, among what the answer
    gave: the items of lists, tuples, sets and dicts, and the fields of models and dataclasses
    the answer set. Not a model's computed fields, nor a field left to its default: those are
    not the answer's, and a model asked again could not change them. Nothing of the user's is
    run: fields are read as the attributes they are."""
    seen: set[int] = set()
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return loc, item
            continue
        if isinstance(item, str | bytes | int) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, sub in item.items():
                stack.extend((((*loc, key), key), ((*loc, key), sub)))
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(((*loc, i), sub) for i, sub in enumerate(item))
        elif isinstance(item, pydantic.BaseModel):
            fields = vars(item)
            extra = item.__pydantic_extra__ or {}
            allowed = _inf_nan_fields(type(item))
            for name in item.model_fields_set - allowed:
                if name in fields or name in extra:
                    stack.append(((*loc, name), fields[name] if name in fields else extra[name]))
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            allowed = _inf_nan_fields(type(item))
            for field in dataclasses.fields(item):
                sub = getattr(item, field.name, None)
                if sub is not field.default and field.name not in allowed:
                    stack.append(((*loc, field.name), sub))
    return None


def not_json(error: pydantic.ValidationError) -> bool:
    """Whether pydantic refused the text it validated as no JSON, rather than for its value."""
    return any(e["type"] == "json_invalid" for e in error.errors(include_url=False))


def lone_surrogate_in(data: Any) -> bool:
    """Whether a string in the JSON value ``data`` (as json.loads reads it) holds half a
    character: a lone surrogate, which has no UTF-8 and which pydantic's JSON reader refuses."""
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def read_json(text: str) -> Any:
    """The value of the JSON ``text``: as pydantic reads it, or, where a string in it escapes a
    lone surrogate (``"\\ud83d"``), which pydantic refuses, as json.loads reads it (as it was
    read before pydantic read it). Raises ValueError for text that is no JSON, or that nests
    deeper than pydantic reads."""
    try:
        return pydantic_core.from_json(text)
    except ValueError as exc:
        refused = exc
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise refused from None
    if not lone_surrogate_in(data):
        raise refused
    return data


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


def describe_error(error: Exception, within: int = 0) -> str:
    """A validation error in a line: where, and what was wrong (at most five places). ``within``
    leaves out the first places of where: the wrapper a value was validated in."""
    if isinstance(error, OutputValidationError):
        return str(error)
    if isinstance(error, pydantic.ValidationError):
        parts = []
        for e in error.errors(include_url=False)[:5]:
            loc = ".".join(str(x) for x in e["loc"][within:]) or "value"
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
