"""Backoff schedules: fixed, exponential (base, factor, cap) and jittered."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from kagura.errors import UsageError
from kagura.resilience import Backoff, exponential, fixed, jittered


def test_fixed_waits_the_same_before_every_retry() -> None:
    backoff = fixed(2.5)
    assert [backoff.delay(n) for n in range(1, 6)] == [2.5] * 5


def test_fixed_accepts_a_timedelta() -> None:
    assert fixed(timedelta(milliseconds=250)).delay(3) == 0.25


def test_exponential_grows_from_base_by_factor() -> None:
    backoff = exponential(0.5, factor=2.0, cap=1000)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_exponential_with_another_factor() -> None:
    backoff = exponential(1.0, factor=3.0, cap=1000)
    assert [backoff.delay(n) for n in range(1, 5)] == [1.0, 3.0, 9.0, 27.0]


def test_exponential_is_capped() -> None:
    backoff = exponential(1.0, factor=2.0, cap=5.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    # A huge retry number neither overflows nor escapes the cap.
    assert backoff.delay(500) == 5.0


def test_exponential_accepts_timedeltas() -> None:
    backoff = exponential(timedelta(seconds=1), cap=timedelta(seconds=3))
    assert [backoff.delay(n) for n in range(1, 4)] == [1.0, 2.0, 3.0]


def test_the_first_retry_waits_the_base() -> None:
    # Retry number 0 is treated like the first retry rather than waiting less than base.
    assert exponential(0.5).delay(0) == 0.5
    assert exponential(0.5).delay(1) == 0.5


def test_full_jitter_draws_from_zero_to_the_delay() -> None:
    backoff = jittered(1.0, factor=2.0, cap=8.0, mode="full")
    rng = random.Random(1234)
    for n in range(1, 7):
        ceiling = min(8.0, 2.0 ** (n - 1))
        draws = [backoff.delay(n, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws)
        # Spread over the whole range, not bunched at one end.
        assert min(draws) < ceiling * 0.1
        assert max(draws) > ceiling * 0.9


def test_equal_jitter_draws_from_half_the_delay_to_the_delay() -> None:
    backoff = jittered(1.0, factor=2.0, cap=8.0, mode="equal")
    rng = random.Random(99)
    for n in range(1, 7):
        ceiling = min(8.0, 2.0 ** (n - 1))
        draws = [backoff.delay(n, rng) for _ in range(300)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert min(draws) < ceiling * 0.55
        assert max(draws) > ceiling * 0.95


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    backoff = jittered(0.5)
    first = [backoff.delay(n, random.Random(7)) for n in range(1, 6)]
    second = [backoff.delay(n, random.Random(7)) for n in range(1, 6)]
    assert first == second


def test_jittered_defaults_to_full_jitter() -> None:
    assert jittered().jitter == "full"
    assert exponential().jitter is None
    assert Backoff(jitter="equal").jitter == "equal"


def test_jitter_without_an_rng_uses_the_module_random() -> None:
    backoff = jittered(1.0, cap=4.0)
    assert all(0.0 <= backoff.delay(3) <= 4.0 for _ in range(50))


@pytest.mark.parametrize(
    "build",
    [
        lambda: fixed(-1),
        lambda: fixed(timedelta(seconds=-1)),
        lambda: exponential(-0.5),
        lambda: exponential(0.5, cap=-1),
        lambda: exponential(0.5, factor=0.5),
        lambda: jittered(0.5, factor=0.9),
        lambda: jittered(0.5, mode="half"),  # type: ignore[arg-type]
        lambda: Backoff(base=-1),
        lambda: Backoff(jitter="sometimes"),  # type: ignore[arg-type]
    ],
    ids=[
        "fixed-negative",
        "fixed-negative-timedelta",
        "negative-base",
        "negative-cap",
        "factor-below-one",
        "jittered-factor-below-one",
        "unknown-jitter-mode",
        "backoff-negative-base",
        "backoff-unknown-jitter",
    ],
)
def test_invalid_arguments_are_usage_errors(build: object) -> None:
    with pytest.raises(UsageError):
        build()  # type: ignore[operator]


def test_a_long_run_of_retries_stays_at_the_cap() -> None:
    # factor ** n passes the largest float after about a thousand retries (or an int factor's
    # power passes what a float holds): the wait is the cap, not an OverflowError.
    assert exponential(0.5, cap=30).delay(5000) == 30.0
    assert exponential(0.5, factor=10, cap=30).delay(400) == 30.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: Backoff(base=float("nan")),
        lambda: Backoff(factor=float("nan")),
        lambda: Backoff(cap="30"),  # type: ignore[arg-type]
        lambda: fixed("1s"),  # type: ignore[arg-type]
    ],
)
def test_a_backoff_of_no_number_is_refused(make: Any) -> None:
    with pytest.raises(UsageError, match="must be a number"):
        make()
