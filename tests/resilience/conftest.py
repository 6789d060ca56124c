"""Fixtures for the resilience tests: isolated shared state, fake clocks, and no real waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from kagura.resilience import reset_breakers, reset_rate_limits, set_testing
from kagura.resilience._config import is_testing


@pytest.fixture(autouse=True)
def _isolated_policies() -> Iterator[None]:
    """Breakers and rate limits are process-wide: every test starts (and leaves) with none."""
    reset_breakers()
    reset_rate_limits()
    yield
    reset_breakers()
    reset_rate_limits()


@pytest.fixture
def no_waits() -> Iterator[None]:
    """Retry and rate-limit waits are computed and recorded, but not slept."""
    previous = is_testing()
    set_testing(True)
    yield
    set_testing(previous)


class FakeClock:
    """A monotonic clock that only moves when told to; its ``sleep`` advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.start = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    @property
    def elapsed(self) -> float:
        return self.now - self.start

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let the other tasks run, as a real sleep would


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def settle(rounds: int = 10) -> None:
    """Let every ready task run until it blocks (no wall-clock time involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def turns_until(predicate: Callable[[], bool], limit: int = 1000) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded by turns, not by time)."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition not reached after {limit} loop turns")
