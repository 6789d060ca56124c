"""Kagura's exceptions.

Two families, kept apart so that callers (and retry policies) can tell "the code is wrong" from
"this run failed"::

    KaguraError
    ├── UsageError                  you used the library wrong; fix the code or the configuration
    │   ├── TemplateError           the agent's docstring prompt is invalid
    │   ├── MissingCredentialsError the provider has no API key; names the env var to set
    │   └── EncryptionKeyError      the store's encrypted values need another (or a) key
    ├── StoreError                  the event store could not be opened, read or written
    └── RunError                    a run failed at run time
        ├── ProviderError           the model provider failed (status code and headers kept)
        │   ├── ProviderTimeout     the request timed out
        │   ├── ProviderConnectionError  the connection failed or was reset
        │   ├── UnsupportedRequestError  the endpoint rejected a response format or native tools
        │   └── StreamBrokenError   a streamed answer failed after part of it was yielded
        ├── OutputParseError        the model's answer never validated against the return type
        ├── ToolLoopError           the model kept calling tools past the round limit
        ├── NonDeterminismError     a resumed durable run took another path than its journal
        ├── RunInProgressError      another process is executing this durable run
        ├── RunTakenOverError       another process took this durable run over (lease lost)
        ├── RunFailedError          a durable run with this id failed before
        ├── RunCancelledError       a durable run was cancelled by its caller
        ├── CircuitOpenError        a circuit breaker is open: the call was refused at once
        ├── BudgetExceeded          a cost or token budget is spent: the call was not sent
        └── WorkerLostError         a kagura.ray batch item's worker process died, again and again

The last two are raised by :mod:`kagura.resilience` (which re-exports them).

Errors raised beneath a provider (aiohttp's, LiteLLM's, llama.cpp's) are translated at the
provider boundary with ``raise ... from exc``, so the original exception stays available as
``__cause__``. An HTTP error answer has none: its status, headers and body are on the error.
"""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BudgetExceeded",
    "CircuitOpenError",
    "EncryptionKeyError",
    "KaguraError",
    "MissingCredentialsError",
    "NonDeterminismError",
    "OutputParseError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderTimeout",
    "RunCancelledError",
    "RunError",
    "RunFailedError",
    "RunInProgressError",
    "RunTakenOverError",
    "StoreError",
    "StreamBrokenError",
    "TemplateError",
    "ToolLoopError",
    "UnsupportedRequestError",
    "UsageError",
    "WorkerLostError",
]


class KaguraError(Exception):
    """Base class of every exception Kagura raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as it is, attributes and notes included, not by calling the constructor
        # again: most take more than the message (a run id, a status code), and an error must
        # come back whole from another process (a kagura.ray worker).
        return _unpickled, (type(self), self.args, self.__dict__)


def _unpickled(cls: type[KaguraError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class UsageError(KaguraError):
    """The library was used wrongly: a bad decorator argument, model string or configuration."""


class TemplateError(UsageError):
    """An agent's docstring is not a valid prompt template for its signature."""


class MissingCredentialsError(UsageError):
    """A provider needs an API key that is not configured. Never retried."""

    def __init__(self, model: str, env_var: str) -> None:
        self.model = model
        self.env_var = env_var
        super().__init__(
            f"model {model!r} needs an API key: set the {env_var} environment variable, "
            f"pass api_key= to the agent, or run offline on the embedded model with "
            f"KAGURA_MODEL_OVERRIDE=local/smollm2"
        )


class EncryptionKeyError(UsageError):
    """Values in the store are encrypted and ``KAGURA_ENCRYPTION_KEY`` does not hold a key that
    decrypts them (or is not set). Never a garbled value: the read fails."""


class StoreError(KaguraError):
    """The event store (recordings and the durable journal) could not be opened, read or
    written. The message names the store (its path, or its URL without the password) and the
    cause; the database driver's exception is kept as ``__cause__``."""

    def __init__(self, store: str, message: str) -> None:
        self.store = store
        super().__init__(f"event store {store}: {message}")


class RunError(KaguraError):
    """A run failed at run time."""


class ProviderError(RunError):
    """The model provider answered with an error, or could not be reached.

    ``status_code`` and ``headers`` are kept (when there was an HTTP answer) so that a retry policy
    can classify the failure and honour ``Retry-After``.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str = "",
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
        body: str | None = None,
    ) -> None:
        self.model: str = model
        self.status_code: int | None = status_code
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        self.body: str | None = body
        prefix = f"{model}: " if model else ""
        status = f"HTTP {status_code}: " if status_code is not None else ""
        super().__init__(f"{prefix}{status}{message}")

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked us to wait, from ``Retry-After`` (seconds or HTTP date)."""
        value = self.headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


class ProviderTimeout(ProviderError, TimeoutError):
    """The provider did not answer in time. Also a builtin ``TimeoutError``, so code written with
    ``except asyncio.TimeoutError`` catches it."""


class ProviderConnectionError(ProviderError):
    """The connection to the provider failed, was refused or was reset."""


class UnsupportedRequestError(ProviderError):
    """The endpoint rejected something the request asked for that it does not support (a
    ``response_format``, native tools). Never retried: sending it again gets the same answer.
    ``feature`` names it: ``"output_mode"`` or ``"tools"``."""

    def __init__(self, message: str, *, feature: str, **details: Any) -> None:
        self.feature = feature
        super().__init__(message, **details)


class StreamBrokenError(ProviderError):
    """A streamed answer failed part-way, after some of it had been yielded to the reader.

    Never retried: a new attempt would yield the same beginning again. The provider's error
    (a :class:`ProviderConnectionError`, a :class:`ProviderTimeout` when the stream stalled
    longer than the per-attempt timeout, ...) is ``__cause__``; ``text`` is the answer as far
    as it had arrived.
    """

    def __init__(self, cause: ProviderError, text: str, items: int) -> None:
        super().__init__(
            f"the stream broke after {len(text)} characters ({items} items yielded), and is "
            f"not retried, which would yield them again: {cause}"
        )
        # The cause's, given after the message: the cause's text already names them.
        self.model: str = cause.model
        self.status_code: int | None = cause.status_code
        self.headers: dict[str, str] = cause.headers
        self.body: str | None = cause.body
        self.text = text
        self.items = items


class OutputParseError(RunError):
    """The model's answer did not validate against the agent's return type, even after re-asking."""

    def __init__(self, agent: str, raw_text: str, validation_error: str, attempts: int) -> None:
        self.agent = agent
        self.raw_text = raw_text
        self.validation_error = validation_error
        self.attempts = attempts
        shown = raw_text if len(raw_text) <= 300 else raw_text[:300] + "..."
        super().__init__(
            f"agent {agent!r}: the model's answer did not match the return type after "
            f"{attempts} attempt(s): {validation_error}\nlast answer: {shown!r}"
        )


class ToolLoopError(RunError):
    """The model kept requesting tool calls beyond ``max_tool_rounds``."""


class NonDeterminismError(RunError):
    """A resumed or replayed durable run took a different path than its journal recorded."""

    def __init__(self, step_key: str, message: str) -> None:
        self.step_key = step_key
        super().__init__(f"step {step_key!r}: {message}")


class RunInProgressError(RunError):
    """The durable run is being executed by another live process."""


class RunTakenOverError(RunError):
    """This process lost the lease of a durable run and another process took it over: nothing
    more of the run is committed from here (the step that raised this was not journaled)."""

    def __init__(self, run_id: str, detail: str = "") -> None:
        self.run_id = run_id
        super().__init__(
            f"durable run {run_id!r} was taken over by another process (this process's lease "
            f"ran out{': ' + detail if detail else ''}); this process stops without committing "
            f"more of it, and the other finishes it"
        )


class RunFailedError(RunError):
    """A durable run with this id already failed; ``resume`` it to try again."""

    def __init__(self, run_id: str, error: str | None, error_type: str | None) -> None:
        self.run_id = run_id
        self.error = error
        self.error_type = error_type
        super().__init__(
            f"durable run {run_id!r} failed earlier ({error_type}: {error}); "
            f"resume it with workflow.resume({run_id!r}) or `kagura runs resume {run_id}`"
        )


class RunCancelledError(RunError):
    """The durable run was cancelled by its caller (``kagura.ray``'s ``RunHandle.cancel()``); it is
    recorded as failed with this error, so that recovery does not start it again. ``resume`` it
    to run it after all."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"durable run {run_id!r} was cancelled by its caller")


class CircuitOpenError(RunError):
    """The circuit breaker is open: the call was refused without reaching the dependency."""

    def __init__(self, name: str, retry_in: float, *, probing: bool = False) -> None:
        self.name = name
        self.retry_in = retry_in
        #: Half-open, its probe calls under way (``retry_in`` says nothing then).
        self.probing = probing
        if probing:  # half-open, its probes under way: no time to give until they end
            super().__init__(
                f"circuit breaker {name!r} is half-open: failing fast while its probe calls "
                "are under way; it closes when they succeed"
            )
            return
        super().__init__(
            f"circuit breaker {name!r} is open: failing fast; "
            f"the next probe is allowed in {retry_in:.1f}s"
        )


class BudgetExceeded(RunError):
    """A cost or token budget is spent: the call was not sent."""

    # Any, not a protocol of the budget's figures: users hand the budget on to code typed for
    # a CostBudget, which this module cannot name (it is the lowest layer, which the module
    # defining the budget imports).
    def __init__(self, message: str, *, budget: Any) -> None:
        #: The :class:`kagura.resilience.CostBudget` that is spent.
        self.budget = budget
        super().__init__(message)


class WorkerLostError(RunError):
    """A batch item of ``kagura.ray.map`` was in flight on a worker whose process died, as many
    times as a batch allows: it was not sent again, since an item that kills the process running
    it (a crash in native code, the memory it takes) would be sent for ever."""

    def __init__(self, item: int, losses: int) -> None:
        #: The item's position in the batch.
        self.item = item
        self.losses = losses
        super().__init__(
            f"batch item {item} was running on a worker whose process died, {losses} times "
            "(killed, out of memory, a crash in native code, its node lost); it was not sent "
            "again. Other items in flight on that worker were sent again too: if this item "
            "kills its worker, run it on its own to see why"
        )
