"""Turning recorded values into stored text: JSON (repr for what JSON cannot hold), with secrets
redacted, then kept whole, hashed or dropped according to the privacy setting.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

import pydantic_core

ContentMode = Literal["full", "hash", "none"]

REDACTED = "[REDACTED]"
_SECRET_KEY = re.compile(
    r"(api[_-]?key|secret|password|passwd|token|authorization|credential)", re.I
)
# Provider key shapes (OpenAI, Anthropic, OpenRouter, Google, bearer tokens) inside free text.
_SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{12,}|sk-ant-[A-Za-z0-9_\-]{12,}|AIza[0-9A-Za-z_\-]{20,}"
    r"|Bearer\s+[A-Za-z0-9._\-]{12,})"
)
# Either of the above, in one pass: the fast path's only check on ordinary values.
_SUSPICIOUS = re.compile(f"{_SECRET_KEY.pattern}|{_SECRET_VALUE.pattern}", re.I)
# Every match of _SUSPICIOUS contains one of these (lowercased). Substring search is a C loop
# over the text, while the regex, an alternation with no literal prefix, is tried at each
# position: about 30 times slower on ordinary text, which rarely holds any of these.
_SUSPICIOUS_WORDS = (
    "api_key",
    "api-key",
    "apikey",
    "secret",
    "password",
    "passwd",
    "token",
    "authorization",
    "credential",
    "sk-",
    "aiza",
    "bearer",
)


def looks_secret(text: str) -> bool:
    """Does ``text`` hold something that may be a secret (a key name or a key-shaped value)?"""
    lowered = text.lower()
    return any(word in lowered for word in _SUSPICIOUS_WORDS) and bool(_SUSPICIOUS.search(text))


MAX_TEXT = 64_000


def scrub(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` with secret-looking keys and values redacted."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _SECRET_VALUE.sub(REDACTED, value)
    if depth > 20:
        text = repr_of(value)
        return REDACTED if _SECRET_VALUE.search(text) else text[:200]
    if isinstance(value, dict):
        return {
            str(k): (REDACTED if _SECRET_KEY.search(str(k)) else scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v, depth + 1) for v in value]
    try:
        plain = pydantic_core.to_jsonable_python(value)
    except Exception:  # unserialisable: stored as its repr, never an error
        return _SECRET_VALUE.sub(REDACTED, repr_of(value))
    return scrub(plain, depth + 1)


def repr_of(value: Any) -> str:
    """``repr(value)``, or a placeholder when the object's ``__repr__`` itself fails."""
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


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
            text = pydantic_core.to_json(_SECRET_VALUE.sub(REDACTED, repr_of(value))).decode()
    if mode == "hash":
        return pydantic_core.to_json({"sha256": hashlib.sha256(text.encode()).hexdigest()}).decode()
    if len(text) > MAX_TEXT:
        text = truncated(text)
    return text


def to_text(value: Any) -> str | None:
    """A recorded value as JSON text (``repr`` for what JSON cannot hold), as it is, unredacted:
    what the recorder sends the writer, which redacts it with :func:`encode_text`."""
    if value is None:
        return None
    try:
        return pydantic_core.to_json(value, fallback=repr_of).decode()
    except Exception:  # not even with the fallback (a cycle, say): its repr, as a JSON string
        return pydantic_core.to_json(repr_of(value)).decode()


# A set, not a frozenset: pydantic-core's exclude takes a set faster (measured: 0.36 µs against
# 0.54 µs a call). Never changed.
_OUTPUT = {"output"}


def result_texts(result: dict[str, Any]) -> tuple[str | None, str | None]:
    """A span's ``output`` and its other result attributes, as :func:`to_text` makes them: on
    the event loop for every span, so written for speed (one ``try``, no new dict)."""
    to_json = pydantic_core.to_json
    try:
        output = result.get("output")
        return (
            None if output is None else to_json(output, fallback=repr_of).decode(),
            to_json(result, exclude=_OUTPUT, fallback=repr_of).decode()
            if len(result) > 1 or (output is None and "output" not in result)
            else None,
        )
    except Exception:  # one value would not serialise: each on its own, the careful way
        extra = {k: v for k, v in result.items() if k != "output"}
        return to_text(result.get("output")), to_text(extra or None)


def encode_text(text: str | None, mode: ContentMode) -> str | None:
    """:func:`encode` for a value already made JSON text by :func:`to_text`."""
    if mode == "none" or text is None:
        return None
    if looks_secret(text):
        try:
            text = pydantic_core.to_json(scrub(pydantic_core.from_json(text))).decode()
        except Exception:
            text = pydantic_core.to_json(_SECRET_VALUE.sub(REDACTED, text)).decode()
    if mode == "hash":
        return pydantic_core.to_json({"sha256": hashlib.sha256(text.encode()).hexdigest()}).decode()
    if len(text) > MAX_TEXT:
        text = truncated(text)
    return text


def truncated(text: str) -> str:
    """What is stored in place of a value whose JSON is longer than ``MAX_TEXT``."""
    return pydantic_core.to_json({"truncated": text[:MAX_TEXT]}).decode()
