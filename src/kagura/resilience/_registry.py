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
    with _ratelimit._registry_lock:
        limits = dict(_ratelimit._registry)
    with _breaker._registry_lock:
        breakers = dict(_breaker._registry)
    return Registry(limits, breakers)


def use_registry(taken: Registry) -> None:
    """Register these limits and breakers in this process, each in place of any of its name."""
    with _ratelimit._registry_lock:
        _ratelimit._registry.update(taken.limits)
    with _breaker._registry_lock:
        _breaker._registry.update(taken.breakers)
