"""Secrets kept out of what Kagura stores: key names and key-shaped values found and redacted.

Used by the recorder (everything it stores) and the durable journal (error texts).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import pydantic_core

REDACTED = "[REDACTED]"
# A secret's name anywhere in a key (client_secret, auth_token), but for the counts and
# settings that share its words: max_tokens, token_count, tokenizer, secretary.
_SECRET_KEY = re.compile(
    r"(api[_-]?key|secret(?!ary)|password|passwd"
    r"|token(?!s|[_-]?(?:count|limit|usage|budget)|i[sz]e)|authorization|credential)",
    re.I,
)
# Secrets inside free text: provider key shapes (OpenAI, Anthropic, OpenRouter, Google, Groq,
# AWS access keys, GitHub and Slack tokens, bearer tokens in RFC 6750's characters, base64's
# among them); a value given to a secret's name ("api_key=...", "password: ...", the end of an
# environment variable's name too: DB_PASSWORD=..., AWS_SECRET_ACCESS_KEY=...), or to an
# Authorization header after its scheme ("Authorization: Basic ..."); a URL's password
# ("postgresql://user:...@host", "redis://:...@host"). For the last two, the name and the URL
# around the secret are kept (see _redacted).
# A name may follow "_" (a word character, so \b, as it was, never matched MY_API_KEY=...), but
# not a letter or digit: "mytoken" stays as it is. One lookbehind, not \b or (?<=_): the
# alternation is tried at every position of every text that may hold a secret. A token's name
# is not one after the prefixes of tokenizers' special tokens and of counts (pad_token =
# "<pad>", max_token=4096): code and outputs of an LLM library's users are full of them. A
# bearer token with "+", "/" or "~" in it holds a digit too: "Bearer tokens/credentials" is
# prose.
_SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{12,}|sk-ant-[A-Za-z0-9_\-]{12,}|AIza[0-9A-Za-z_\-]{20,}"
    r"|gsk_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
    r"|xox[abpr]-[A-Za-z0-9\-]{10,}"
    r"|Bearer\s+(?:(?=[A-Za-z0-9._~+/\-]*\d)[A-Za-z0-9._~+/\-]{12,}=*|[A-Za-z0-9._\-]{12,}))"
    r"|(?P<name>(?<![^\W_])(?i:(?:api[_-]?key|access[_-]?key|secret[_-]?key|client[_-]?secret"
    r"|(?<!pad_)(?<!eos_)(?<!bos_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)(?<!max_)(?<!num_)"
    r"(?<!prompt_)(?<!completion_)(?<!input_)(?<!output_)token"
    r"|password|passwd|pwd)\b[\"']?\s*[=:]\s*[\"']?"
    r"|authorization[\"']?\s*[=:]\s*[\"']?(?:basic|bearer)\s+))"
    r"(?P<value>[^\s\"'&,;]{4,})"
    r"|(?P<userinfo>://[^/\s:@]*:)(?P<password>[^/\s@]+)(?=@)"
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
    "access_key",
    "access-key",
    "accesskey",
    "secret",
    "password",
    "passwd",
    "pwd",
    "token",
    "authorization",
    "credential",
    "sk-",
    "aiza",
    "gsk_",
    "akia",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xox",
    "bearer",
    "://",  # a URL's password (scheme://user:password@host)
)


def looks_secret(text: str) -> bool:
    """Does ``text`` hold something that may be a secret (a key name or a key-shaped value)?"""
    lowered = text.lower()
    return any(word in lowered for word in _SUSPICIOUS_WORDS) and bool(_SUSPICIOUS.search(text))


def is_secret_name(name: str) -> bool:
    """Is ``name`` (a key, a header's or a variable's name) a secret's name?"""
    return _SECRET_KEY.search(name) is not None


def secret_names(environ: Mapping[str, str]) -> list[str]:
    """The names in ``environ`` (the environment) of the values that are secrets by their name:
    ``*_API_KEY``, ``*_SECRET*``, ``*_TOKEN``, ``*_PASSWORD``."""
    return [name for name in environ if _SECRET_KEY.search(name)]


def scrub(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` with secret-looking keys and values redacted."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
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
        return redact_text(repr_of(value))
    return scrub(plain, depth + 1)


def by_name(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A call's arguments by parameter name (defaults included), as they are recorded: a
    secret's name (``api_key``, ``password``) then redacts its value however it was passed. As
    given (``args`` and ``kwargs``) when there is no signature, or they do not bind to it."""
    if signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            pass
        else:
            bound.apply_defaults()
            return dict(bound.arguments)
    return {"args": args, "kwargs": kwargs}


def signature_of(fn: Any) -> inspect.Signature | None:
    """``fn``'s signature, or ``None`` for a callable that has none to show."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def repr_of(value: Any) -> str:
    """``repr(value)``, or a placeholder when the object's ``__repr__`` itself fails."""
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


def str_of(error: BaseException) -> str:
    """``str(error)``, or a note saying it failed when the exception's ``__str__`` itself
    raises: what is recorded of an exception must never take its place."""
    try:
        return str(error)
    except Exception as why:
        return f"<str() of {type(error).__qualname__} failed: {repr_of(why)}>"


def redact_text(text: str) -> str:
    """``text`` with key-shaped values in it redacted."""
    return _SECRET_VALUE.sub(_redacted, text)


def _redacted(match: re.Match[str]) -> str:
    if match.group("name") is not None:  # api_key=VALUE: the name stays
        return match.group("name") + REDACTED
    if match.group("userinfo") is not None:  # ://user:PASSWORD@: the user and host stay
        return match.group("userinfo") + REDACTED
    return REDACTED
