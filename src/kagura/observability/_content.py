"""Turning recorded values into stored text: JSON (repr for what JSON cannot hold), with secrets
redacted, then kept whole, hashed or dropped according to the privacy setting.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import pydantic_core

from .._redact import looks_secret, redact_text, repr_of, scrub
from .._settings import ContentMode

MAX_TEXT = 64_000


def encode(value: Any, mode: ContentMode) -> str | None:
    """Stored text for a recorded value, or ``None`` when content is not recorded."""
    if mode == "none" or value is None:
        return None
    text: str | None
    try:
        # Fast path: serialise in one go, and scrub only when something looks like a secret
        # (most values have neither a secret-named key nor a key-shaped string).
        text = pydantic_core.to_json(value, fallback=repr_of).decode()
    except Exception:
        text = None
    if text is None or looks_secret(text):
        try:
            text = pydantic_core.to_json(scrub(value)).decode()
        except Exception:
            text = pydantic_core.to_json(redact_text(repr_of(value))).decode()
    if mode == "hash":
        return pydantic_core.to_json({"sha256": hashlib.sha256(text.encode()).hexdigest()}).decode()
    if len(text) > MAX_TEXT:
        text = truncated(text)
    return text


def to_text(value: Any) -> str | None:
    """A recorded value as JSON text (``repr`` for what JSON cannot hold), as it is, unredacted:
    what the writer redacts with :func:`encode_text`."""
    json = to_json(value)
    return None if json is None else json.decode()


def to_json(value: Any) -> bytes | None:
    """:func:`to_text` as the UTF-8 bytes pydantic-core makes (see :func:`recorded`)."""
    if value is None:
        return None
    try:
        return pydantic_core.to_json(value, fallback=repr_of)
    except Exception:  # not even with the fallback (a cycle, say): its repr, as a JSON string
        return pydantic_core.to_json(repr_of(value))


# A set, not a frozenset, which pydantic-core's exclude takes more slowly; it is never changed.
_OUTPUT = {"output"}


def result_texts(result: dict[str, Any]) -> tuple[bytes | None, bytes | None]:
    """A span's ``output`` and its other result attributes as JSON (:func:`to_json`), in one
    ``try`` and with no new dict."""
    encode = pydantic_core.to_json
    try:
        output = result.get("output")
        return (
            None if output is None else encode(output, fallback=repr_of),
            encode(result, exclude=_OUTPUT, fallback=repr_of)
            if len(result) > 1 or (output is None and "output" not in result)
            else None,
        )
    except Exception:  # one value would not serialise: each on its own, the careful way
        extra = {k: v for k, v in result.items() if k != "output"}
        return to_json(result.get("output")), to_json(extra or None)


#: Values that are immutable and that marshal carries and JSON holds as they are.
_ATOMIC = frozenset({str, int, float, bool, type(None)})


# The recorder hands the writer process each span's atomic recorded values (most outputs) as
# they are, so that JSON encoding runs there, off the event loop. Everything else it encodes at
# once: a user's list or dict could change after the call, and any container waiting in the
# recorder's queue is one more object for the garbage collector, tracked or not (measured: a
# dict a span in the queue made 2,000 concurrent runs take 12 more young collections and one
# full one, slower by a third). An encoded value goes as JSON bytes: no atomic value is bytes.


def recorded(value: Any) -> Any:
    """A span's start value (its inputs, or an LLM attempt's messages) as the recorder sends it:
    the value itself when atomic, else its JSON bytes."""
    return value if type(value) in _ATOMIC else to_json(value)


def recorded_messages(messages: Any) -> Any:
    """An LLM attempt's messages as the recorder sends them: the text alone when they are one
    user message (an agent's first attempt), else as :func:`recorded` sends any value. Only an
    LLM attempt's inputs are ever sent as text (see ``as_inputs_text``)."""
    if type(messages) in (tuple, list) and len(messages) == 1:
        message = messages[0]
        if type(message) is dict and len(message) == 2 and message.get("role") == "user":
            content = message.get("content")
            if type(content) is str:
                return content
    return recorded(messages)


def recorded_result(result: dict[str, Any]) -> tuple[Any, bytes | None]:
    """A span's ``output`` and its other result attributes as the recorder sends them: the
    output as it is when atomic, else as JSON bytes; the attributes as JSON bytes."""
    output = result.get("output", result)
    if type(output) in _ATOMIC:
        if len(result) == 1:
            return output, None
        if len(result) == 2:  # an agent's: {"output": ..., "answered_by": model id}
            answered_by = result.get("answered_by")
            if type(answered_by) is str:
                return output, _answered_by(answered_by)
        try:
            return output, pydantic_core.to_json(result, exclude=_OUTPUT, fallback=repr_of)
        except Exception:  # one value would not serialise: the careful way
            pass
    return result_texts(result)


def as_inputs_text(value: Any, kind: str) -> str | None:
    """A span's inputs as the recorder sent them (see :func:`recorded_messages`), as JSON text
    (in the writer)."""
    if kind == "llm" and type(value) is str:
        try:
            return pydantic_core.to_json([{"role": "user", "content": value}]).decode()
        except ValueError:  # a lone surrogate (a file name that was not UTF-8): no UTF-8 for it
            value = value.encode("utf-8", "replace").decode()
            return pydantic_core.to_json([{"role": "user", "content": value}]).decode()
    return as_text(value)


@functools.lru_cache(maxsize=256)
def _answered_by(model: str) -> bytes:
    # The same few models answer call after call.
    return pydantic_core.to_json({"answered_by": model})


def as_text(value: Any) -> str | None:
    """A recorded value as :func:`recorded` or :func:`recorded_result` sent it, as JSON text
    (in the writer)."""
    if type(value) is bytes:
        return value.decode()
    if type(value) is str:  # most outputs: no fallback needed (and none to pay for)
        try:
            return pydantic_core.to_json(value).decode()
        except ValueError:  # a lone surrogate (a file name that was not UTF-8): no UTF-8 for it
            return pydantic_core.to_json(value.encode("utf-8", "replace").decode()).decode()
    return to_text(value)


def encode_text(text: str | None, mode: ContentMode) -> str | None:
    """:func:`encode` for a value already made JSON text by :func:`to_text`."""
    if mode == "none" or text is None:
        return None
    if looks_secret(text):
        try:
            text = pydantic_core.to_json(scrub(pydantic_core.from_json(text))).decode()
        except Exception:
            text = pydantic_core.to_json(redact_text(text)).decode()
    if mode == "hash":
        return pydantic_core.to_json({"sha256": hashlib.sha256(text.encode()).hexdigest()}).decode()
    if len(text) > MAX_TEXT:
        text = truncated(text)
    return text


def attributes_text(text: str | None, mode: ContentMode) -> str | None:
    """A span's other result attributes (JSON text, see :func:`recorded_result`) as stored:
    kept whatever the content mode (the model that answered, the finish reason), redacted; but
    the arguments of the tool calls an LLM attempt asked for are the model's output, hashed or
    left out as outputs are."""
    if text is not None and (mode != "full" or len(text) > MAX_TEXT) and '"tool_calls"' in text:
        try:
            attributes = pydantic_core.from_json(text)
        except ValueError:
            attributes = None
        calls = attributes.get("tool_calls") if isinstance(attributes, dict) else None
        if isinstance(attributes, dict) and isinstance(calls, list):
            # Long arguments cut each, rather than every attribute given up for them.
            room = MAX_TEXT // (2 * max(1, len(calls)))
            attributes["tool_calls"] = [_call_as_stored(call, mode, room) for call in calls]
            text = pydantic_core.to_json(attributes, fallback=repr_of).decode()
    return encode_text(text, "full")


def _call_as_stored(call: Any, mode: ContentMode, room: int) -> Any:
    if not isinstance(call, dict) or "arguments" not in call:
        return call
    arguments = call["arguments"]
    kept = {name: value for name, value in call.items() if name != "arguments"}
    if mode == "hash" and isinstance(arguments, str):
        kept["arguments"] = pydantic_core.from_json(encode_text(arguments, "hash") or "null")
    elif mode == "full":
        fits = not isinstance(arguments, str) or len(arguments) <= room
        kept["arguments"] = arguments if fits else arguments[: room - 1] + "…"
    return kept


def truncated(text: str) -> str:
    """What is stored in place of a value whose JSON is longer than ``MAX_TEXT``."""
    return pydantic_core.to_json({"truncated": text[:MAX_TEXT]}).decode()
