"""A switch for tests: make every policy wait skip the real sleep (waits are still computed and
recorded), so resilience tests run in milliseconds. Like stamina's ``set_testing``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

_skip_waits = False


def set_testing(skip_waits: bool) -> None:
    """Skip (``True``) or restore (``False``) the real sleeps of retries and rate limiters."""
    global _skip_waits
    _skip_waits = skip_waits


def is_testing() -> bool:
    return _skip_waits


@contextmanager
def no_waits() -> Iterator[None]:
    """Within the block, policy waits return at once."""
    previous = _skip_waits
    set_testing(True)
    try:
        yield
    finally:
        set_testing(previous)


async def sleep(seconds: float) -> None:
    if _skip_waits or seconds <= 0:
        await asyncio.sleep(0)  # still a checkpoint: cancellation is delivered here
    else:
        await asyncio.sleep(seconds)
