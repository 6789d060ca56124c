"""Cluster-wide resilience: one RateLimiter, CircuitBreaker, RetryBudget or CostBudget for every
worker of the cluster.

How an object becomes one for the cluster: :func:`install_in_driver` registers Ray serializers
for the four classes, so wherever such an object sits in what a task takes along (an agent's
policies, which an ``Agent`` pickles through its constructor's options; a workflow's; the
budgets of :func:`kagura.ray.map`), Ray's pickler (cloudpickle, whose dispatch table is consulted
for nested objects too) sends a reference to a *state actor* instead. The driver creates that
actor on first sight of the object, so it lives as long as the driver's job: a named async Ray
actor (namespace ``kagura``, named by kind and object name; unnamed budgets and limiters get one
per object) that holds a real object of the class and does the work there. In the worker the
reference is unpickled as a proxy, a subclass of the public class whose awaited seams
(``acquire``, ``admit``, ``settle``, ``spend``) ask the actor: the actor's ``acquire`` awaits
the real limiter's, so its FIFO order and rates hold for the cluster.

The sync methods of a proxy (``before_call``, ``try_spend``, ``check``, ``state``) wait for the
actor with ``ray.get``, blocking the event loop for a round trip: the agent's paths never use
them. Those whose answer is not needed (``record_*``, ``charge``, ``penalise``, a permit's
``settle``) are sent without waiting.

In the driver the user's objects stay as they are; before and after a batch, :func:`settle`
brings a budget and its actor together (what the driver spent on its own, what the workers did).
An object that comes back from a worker (a ``BudgetExceeded`` names its budget) is the driver's
own again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
import weakref
from typing import Any, Literal

import ray

from .._context import current_span
from .._instrument import span_event
from .._usage import Usage
from ..errors import BudgetExceeded, CircuitOpenError
from ..resilience import CircuitBreaker, CostBudget, Permit, RateLimiter, RetryBudget
from ._config import NAMESPACE

# CircuitBreaker's states (its module is the resilience package's own).
BreakerState = Literal["closed", "open", "half_open"]

Shareable = RateLimiter | CircuitBreaker | RetryBudget | CostBudget

#: What travels instead of an object: its kind, its actor's name, its settings, what of it stays
#: with the proxy rather than the actor (a breaker's predicate and callback), the actor.
Reference = tuple[str, str, dict[str, Any], dict[str, Any], Any]

_KINDS: dict[type[Any], str] = {
    RateLimiter: "rate-limiter",
    CircuitBreaker: "circuit-breaker",
    RetryBudget: "retry-budget",
    CostBudget: "cost-budget",
}

# A RateLimiter's default name says nothing of which limit it is: two such limiters are two.
_DEFAULT_LIMITER_NAME = "rate-limit"


# -- the state actor ---------------------------------------------------------------------------


class _Counted(Exception):
    """A failure the proxy judged a health signal (its breaker's ``failure_on``)."""


class _NotCounted(Exception):
    """A failure that is not one (a bad request, a cancellation)."""


def _counted(error: BaseException) -> bool:
    return isinstance(error, _Counted)


class SharedState:
    """The Ray actor holding the one real object (made a Ray actor by :func:`_actor_for`)."""

    def __init__(self, kind: str, settings: dict[str, Any]) -> None:
        self.kind = kind
        self.obj: Any = _make(kind, settings)

    # RateLimiter
    async def acquire(self, tokens: int) -> float:
        start = time.monotonic()
        await self.obj.acquire(tokens)
        return time.monotonic() - start

    async def penalise(self, retry_after: float | None) -> float:
        self.obj.penalise(retry_after)
        multiplier: float = self.obj.rate_multiplier
        return multiplier

    async def settle_tokens(self, estimate: int, actual: int) -> None:
        self.obj._settle(estimate, actual)

    async def rate_multiplier(self) -> float:
        multiplier: float = self.obj.rate_multiplier
        return multiplier

    # CircuitBreaker
    async def admit(self) -> tuple[int | None, float, bool]:
        """Admitted: ``(the breaker's period, 0, False)``, for the outcome to be recorded with;
        refused: ``(None, seconds until the next probe, whether probes are under way)``."""
        try:
            period: int = self.obj.before_call()
        except CircuitOpenError as error:
            return None, error.retry_in, error.probing
        return period, 0.0, False

    async def record(
        self, counted: bool | None, admitted: int | None = None
    ) -> tuple[BreakerState, BreakerState]:
        """An outcome: ``None`` a success, ``True`` a counted failure, ``False`` another, of the
        call whose admission returned ``admitted``."""
        old: BreakerState = self.obj._state
        if counted is None:
            self.obj.record_success(admitted=admitted)
        else:
            self.obj.record_failure(_Counted() if counted else _NotCounted(), admitted=admitted)
        new: BreakerState = self.obj._state
        return old, new

    async def reset(self) -> None:
        self.obj.reset()

    async def state(self) -> tuple[BreakerState, int]:
        return self.obj.state, self.obj.failures

    # RetryBudget
    async def spend(self) -> tuple[bool, int]:
        return self.obj.try_spend(), self.obj.used

    # CostBudget
    async def check(self, free: bool) -> tuple[str | None, float, int, int]:
        try:
            self.obj.check(free=free)
        except BudgetExceeded as error:
            return str(error), *self._spent()
        return None, *self._spent()

    async def charge(self, usage: Usage, cost: float | None) -> tuple[float, int, int]:
        self.obj.charge(usage, cost)
        return self._spent()

    def _spent(self) -> tuple[float, int, int]:
        return self.obj.spent_usd, self.obj.spent_tokens, self.obj.unpriced_calls

    async def add(self, own: dict[str, Any]) -> dict[str, Any]:
        """Count what the driver spent on its own (for :func:`settle`); what is counted now."""
        for field, value in own.items():
            setattr(self.obj, field, getattr(self.obj, field) + value)
        return await self.snapshot()

    async def snapshot(self) -> dict[str, Any]:
        """What the object has counted."""
        if self.kind == "retry-budget":
            return {"used": self.obj.used}
        if self.kind == "cost-budget":
            spent_usd, spent_tokens, unpriced = self._spent()
            return {
                "spent_usd": spent_usd,
                "spent_tokens": spent_tokens,
                "unpriced_calls": unpriced,
            }
        return {}


def _settings(obj: Shareable) -> dict[str, Any]:
    """What makes the object again elsewhere: its settings and what it has counted so far."""
    if isinstance(obj, RateLimiter):
        return {
            "name": obj.name,
            "requests_per_second": obj.request_rate,
            "tokens_per_minute": obj.token_rate * 60 if obj.token_rate is not None else None,
            "burst": int(obj.request_capacity),
            "slowdown": obj.slowdown,
            "recovery_time": obj.recovery_time,
            "max_retry_after": obj.max_retry_after,
        }
    if isinstance(obj, CircuitBreaker):
        return {
            "name": obj.name,
            "failure_threshold": obj.failure_threshold,
            "recovery_time": obj.recovery_time,
            "half_open_probes": obj.half_open_probes,
        }
    if isinstance(obj, RetryBudget):
        return {"max_retries": obj.max_retries, "name": obj.name, "used": obj.used}
    return {
        "usd": obj.usd,
        "tokens": obj.tokens,
        "name": obj.name,
        "spent_usd": obj.spent_usd,
        "spent_tokens": obj.spent_tokens,
        "unpriced_calls": obj.unpriced_calls,
    }


def _make(kind: str, settings: dict[str, Any]) -> Any:
    """The real object of ``settings``, in its actor."""
    options = dict(settings)
    counted = {
        name: options.pop(name)
        for name in ("used", "spent_usd", "spent_tokens", "unpriced_calls")
        if name in options
    }
    obj: Any
    if kind == "rate-limiter":
        obj = RateLimiter(**options)
    elif kind == "circuit-breaker":
        # The proxy judges each error with the breaker's own predicate: the actor is told only
        # whether it counts (errors need not pickle, nor the predicate).
        obj = CircuitBreaker(**options, failure_on=_counted)
    elif kind == "retry-budget":
        obj = RetryBudget(**options)
    else:
        obj = CostBudget(**options)
    for name, value in counted.items():
        setattr(obj, name, value)
    return obj


# -- in the driver -------------------------------------------------------------------------------

_lock = threading.Lock()
_installed = False
# Per driver job: the actor of each name, with the settings it was made with.
_job: str | None = None
_actors: dict[str, tuple[dict[str, Any], Any]] = {}
# The name under which each of the driver's objects is shared, and each name's first object
# (what comes back from a worker is that object again).
_names: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_originals: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
# What each of the driver's budgets had counted when it last agreed with its actor (made from
# it, or settled): what the driver spent on its own since, its own calls, is the difference.
_agreed: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
# One settling of a budget at a time (maps run at once share it): another's write to the
# object while this one waits for the actor would read as the driver's own spending. By event
# loop, since an asyncio lock is bound to one.
_settling: weakref.WeakKeyDictionary[Any, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)
_creator: concurrent.futures.ThreadPoolExecutor | None = None


def install_in_driver() -> None:
    """Send the four shareable classes to Ray's workers as references to their state actors
    (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        for cls in _KINDS:
            ray.util.register_serializer(cls, serializer=_serialize, deserializer=_deserialize)
        _installed = True


def _actor_name(obj: Shareable, kind: str) -> str:
    name: str | None = obj.name
    if kind == "rate-limiter" and name == _DEFAULT_LIMITER_NAME:
        name = None
    if name is not None:
        return f"kagura-{kind}:{name}"
    named = _names.get(obj)
    if named is None:
        named = _names[obj] = f"kagura-{kind}:{uuid.uuid4().hex}"
    return named


def _serialize(obj: Shareable) -> Reference:
    kind = _KINDS[type(obj)]
    with _lock:
        name = _actor_name(obj, kind)
        _originals.setdefault(name, obj)
    settings, actor = _actor_for(kind, name, obj)
    local: dict[str, Any] = {}
    if isinstance(obj, CircuitBreaker):
        local = {"failure_on": obj.failure_on, "on_state_change": obj.on_state_change}
    return kind, name, settings, local, actor


def _actor_for(kind: str, name: str, obj: Shareable) -> tuple[dict[str, Any], Any]:
    global _job, _creator
    job = ray.get_runtime_context().get_job_id()
    with _lock:
        if _job != job:  # a new ray.init: the old job's actors are gone
            _actors.clear()
            _job = job
        known = _actors.get(name)
        if known is not None:
            return known
        if _creator is None:
            _creator = concurrent.futures.ThreadPoolExecutor(1, "kagura-shared-state")
        settings = _settings(obj)
        # Made from another thread: this runs inside Ray's pickling of a task's arguments, whose
        # state (the object refs found so far) is per thread, and making an actor pickles too.
        actor = _creator.submit(_create, kind, name, settings).result()
        _actors[name] = (settings, actor)
        if kind in _BUDGETS:
            _agreed[obj] = {field: settings[field] for field in _BUDGETS[kind]}
        return settings, actor


def _create(kind: str, name: str, settings: dict[str, Any]) -> Any:
    cls: Any = ray.remote(SharedState)
    return cls.options(
        name=name,
        namespace=NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        # A limiter's waiters are calls of the actor in flight, each until its turn comes.
        max_concurrency=100_000,
    ).remote(kind, settings)


#: What a budget counts, by kind: what :func:`settle` brings together.
_BUDGETS = {
    "retry-budget": ("used",),
    "cost-budget": ("spent_usd", "spent_tokens", "unpriced_calls"),
}


async def settle(objects: tuple[Any, ...]) -> None:
    """Bring each budget of ``objects`` and its actor together, before and after a batch: the
    actor counts what the driver spent on its own since they last agreed (its own calls, between
    batches or during one), and the driver's object shows what the actor counted (the batch's
    calls on every worker)."""
    wanted = []
    with _lock:
        for obj in objects:
            kind = _KINDS.get(type(obj))
            known = _actors.get(_actor_name(obj, kind)) if kind in _BUDGETS else None
            if kind is not None and known is not None:
                wanted.append((obj, _BUDGETS[kind], known[1]))
    for obj, fields, actor in wanted:
        async with _settling_lock(obj):
            counted = {field: getattr(obj, field) for field in fields}
            # Another object of its name made the actor: all it counted is its own.
            agreed = _agreed.get(obj) or dict.fromkeys(fields, 0)
            total = await actor.add.remote({f: counted[f] - agreed[f] for f in fields})
            for field in fields:
                # And what the driver spent while the actor answered.
                setattr(obj, field, total[field] + getattr(obj, field) - counted[field])
            _agreed[obj] = total


def _settling_lock(obj: Any) -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    held = _settling.get(obj)
    if held is None or held[0] is not loop:
        held = _settling[obj] = (loop, asyncio.Lock())
    return held[1]


# -- in a worker -----------------------------------------------------------------------------------


def _deserialize(reference: Reference) -> Any:
    kind, name = reference[0], reference[1]
    original = _originals.get(name)
    if original is not None:  # back in the driver
        return original
    # A proxy per task rather than one per process: proxies hold nothing but the actor, and a
    # budget's ``with`` keeps its tokens on the object, so tasks entering one object at once
    # would reset each other's.
    return _PROXIES[kind](reference)


def install_in_worker() -> None:
    """Nothing more: a worker takes the driver's registries (``limit_model``,
    ``circuit_breaker(name)``) with each task (see :mod:`kagura.ray._worker`)."""


class _Proxy:
    """What the proxies share: the actor, and pickling as a reference to it."""

    _actor: Any
    _reference: Reference

    def _bind(self, reference: Reference) -> None:
        self._actor = reference[4]
        self._reference = reference

    def __reduce__(self) -> tuple[Any, ...]:
        return _deserialize, (self._reference,)


class SharedRateLimiter(_Proxy, RateLimiter):
    """A :class:`RateLimiter` whose buckets are its actor's."""

    def __init__(self, reference: Reference) -> None:
        RateLimiter.__init__(self, **reference[2])
        self._bind(reference)

    async def acquire(self, tokens: int = 0) -> Permit:
        ref = self._actor.acquire.remote(tokens)
        try:
            waited: float = await ref
        except asyncio.CancelledError:
            ray.cancel(ref)  # its turn is not taken by a call that has gone
            raise
        if waited > 0:
            span_event(current_span.get(), "rate_limit_wait", limiter=self.name, wait=waited)
        self.admitted += 1
        self.waited += waited
        return Permit(self, tokens)

    def _settle(self, estimate: int, actual: int) -> None:
        if self.token_rate is not None:
            self._actor.settle_tokens.remote(estimate, actual)

    def penalise(self, retry_after: float | None = None) -> None:
        self._actor.penalise.remote(retry_after)
        span_event(
            current_span.get(),
            "rate_limit_slowdown",
            limiter=self.name,
            rate_multiplier=None,
            retry_after=retry_after,
        )

    @property
    def rate_multiplier(self) -> float:
        multiplier: float = ray.get(self._actor.rate_multiplier.remote())
        return multiplier


class SharedCircuitBreaker(_Proxy, CircuitBreaker):
    """A :class:`CircuitBreaker` whose state is its actor's; ``failure_on`` is judged here,
    where the error is, and ``on_state_change`` called where a change was made."""

    def __init__(self, reference: Reference) -> None:
        CircuitBreaker.__init__(self, **reference[2], **reference[3])
        self._bind(reference)

    @property
    def state(self) -> BreakerState:
        state: BreakerState
        state, self._failures = ray.get(self._actor.state.remote())
        self._state = state
        return state

    async def admit(self) -> int | None:
        return self._admitted(await self._actor.admit.remote())

    def _admitted(self, answer: tuple[int | None, float, bool]) -> int:
        period, retry_in, probing = answer
        if period is None:
            raise CircuitOpenError(self.name, retry_in, probing=probing)
        return period

    async def settle(self, error: BaseException | None, admitted: int | None = None) -> None:
        counted = None if error is None else self.failure_on(error)
        if counted is False:
            # Not a health signal (a cancellation among them): nothing to wait for.
            self._actor.record.remote(False, admitted)
            return
        old, new = await self._actor.record.remote(counted, admitted)
        self._changed(old, new)

    def _changed(self, old: BreakerState, new: BreakerState) -> None:
        self._state = new
        if old != new:
            span_event(current_span.get(), "breaker_state", breaker=self.name, old=old, new=new)
            if self.on_state_change is not None:
                self.on_state_change(self, old, new)

    def before_call(self) -> int:
        return self._admitted(ray.get(self._actor.admit.remote()))

    def record_success(self, *, admitted: int | None = None) -> None:
        self._actor.record.remote(None, admitted)

    def record_failure(self, error: BaseException, *, admitted: int | None = None) -> None:
        self._actor.record.remote(self.failure_on(error), admitted)

    def reset(self) -> None:
        self._actor.reset.remote()


class SharedRetryBudget(_Proxy, RetryBudget):
    """A :class:`RetryBudget` counted by its actor; ``used`` is the last figure it gave."""

    def __init__(self, reference: Reference) -> None:
        settings = reference[2]
        RetryBudget.__init__(self, settings["max_retries"], name=settings["name"])
        self.used = settings["used"]
        self._bind(reference)

    async def spend(self) -> bool:
        spent: bool
        spent, self.used = await self._actor.spend.remote()
        return spent

    def try_spend(self) -> bool:
        spent: bool
        spent, self.used = ray.get(self._actor.spend.remote())
        return spent


class SharedCostBudget(_Proxy, CostBudget):
    """A :class:`CostBudget` counted by its actor; the ``spent_*`` figures are the last it
    gave."""

    def __init__(self, reference: Reference) -> None:
        settings = reference[2]
        CostBudget.__init__(
            self, usd=settings["usd"], tokens=settings["tokens"], name=settings["name"]
        )
        self.spent_usd = settings["spent_usd"]
        self.spent_tokens = settings["spent_tokens"]
        self.unpriced_calls = settings["unpriced_calls"]
        self._bind(reference)

    def _answered(self, answer: tuple[str | None, float, int, int]) -> None:
        message, self.spent_usd, self.spent_tokens, self.unpriced_calls = answer
        if message is not None:
            raise BudgetExceeded(message, budget=self)

    async def admit(self, *, free: bool) -> None:
        self._answered(await self._actor.check.remote(free))

    def check(self, *, free: bool) -> None:
        self._answered(ray.get(self._actor.check.remote(free)))

    async def settle(self, usage: Usage, cost: float | None) -> None:
        self.spent_usd, self.spent_tokens, self.unpriced_calls = await self._actor.charge.remote(
            usage, cost
        )

    def charge(self, usage: Usage, cost: float | None) -> None:
        self._actor.charge.remote(usage, cost)


_PROXIES: dict[str, Any] = {
    "rate-limiter": SharedRateLimiter,
    "circuit-breaker": SharedCircuitBreaker,
    "retry-budget": SharedRetryBudget,
    "cost-budget": SharedCostBudget,
}
