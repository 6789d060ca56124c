"""The process-wide registries, whole: the model rate limits of ``limit_model`` and the breakers
of ``circuit_breaker(name)`` (``breaker=True`` included), for code that runs agents in other
processes and must take them along (``kagura.ray`` sends them with each task, so that they are
one object for the whole cluster)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import _breaker, _ratelimit
from ._breaker import CircuitBreaker
from ._ratelimit import RateLimiter


@dataclass(frozen=True, slots=True)
class Registry:
    """Rate limits by model (``provider/model``) and breakers by name."""

    limits: Mapping[str, RateLimiter] = field(default_factory=dict)
    breakers: Mapping[str, CircuitBreaker] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.limits or self.breakers)


def registry() -> Registry:
    """What this process has registered, as it is now (a copy)."""
    return Registry(_ratelimit.model_limits(), _breaker.shared_breakers())


def use_registry(taken: Registry) -> None:
    """Register these limits and breakers in this process, each in place of any of its name."""
    _ratelimit.set_model_limits(taken.limits)
    _breaker.share_breakers(taken.breakers)
