"""Which failures are worth retrying, and the exception types given to say which.

Transient: HTTP 408, 409, 425, 429 and 5xx, timeouts, connection errors. Never: authentication,
permission, bad requests, features the endpoint does not support, usage errors, output that did
not parse, and cancellation (which is not an error at all: it always propagates).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TypeGuard

from ..errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    UnsupportedRequestError,
    UsageError,
)

TRANSIENT_STATUS = frozenset({408, 409, 425, 429})


def is_transient(error: BaseException) -> bool:
    """The default ``retry_on`` predicate."""
    if isinstance(error, asyncio.CancelledError | UsageError | UnsupportedRequestError):
        return False
    if isinstance(error, ProviderTimeout | ProviderConnectionError | TimeoutError):
        return True
    if isinstance(error, ProviderError):
        status = error.status_code
        if status is None:
            # No HTTP status: a malformed or truncated answer is worth another try.
            return error.body is not None or "malformed" in str(error)
        return status in TRANSIENT_STATUS or status >= 500
    return isinstance(error, ConnectionError)


def retry_after(error: BaseException) -> float | None:
    """Seconds the server asked us to wait before trying again, if it said."""
    return error.retry_after if isinstance(error, ProviderError) else None


def exception_types(
    value: object,
    what: str,
    *,
    takes: str = "an exception type, such as ProviderError, or a tuple of them",
) -> type[BaseException] | tuple[type[BaseException], ...]:
    """``value`` if it is an exception type, its types (flattened) if it is a tuple of them as
    ``except`` takes one (nested tuples, or none at all: the empty tuple matches nothing), else
    a :class:`~kagura.errors.UsageError` naming ``what``: a wrong one would otherwise pass
    unnoticed until the first failure, and then replace that failure with a ``TypeError``."""
    if _is_exception_type(value):
        return value
    if isinstance(value, tuple):
        members = tuple(_members(value))
        types = tuple(t for t in members if _is_exception_type(t))
        if len(types) == len(members):
            return types
        wrong = next(m for m in members if not _is_exception_type(m))
        raise UsageError(
            f"{what} must be {takes}, got {value!r}: {wrong!r} is not an exception type"
        )
    raise UsageError(f"{what} must be {takes}, got {value!r}")


def _members(value: tuple[object, ...]) -> Iterator[object]:
    # Nested tuples too, as except reads them: retry_on=(ProviderError, MY_ERRORS).
    for member in value:
        if isinstance(member, tuple):
            yield from _members(member)
        else:
            yield member


def _is_exception_type(value: object) -> TypeGuard[type[BaseException]]:
    return isinstance(value, type) and issubclass(value, BaseException)
