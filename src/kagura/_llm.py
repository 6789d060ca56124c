"""The one seam every LLM attempt passes through.

Each attempt gets its own ``llm`` span (model, tokens, cost, latency, status). Resilience policies
wrap calls to :func:`attempt`, so every retry is its own recorded attempt. A model not yet set up
(:meth:`kagura.providers.Model.prepare`) is set up first, outside the attempt's timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import _instrument
from ._context import Span
from ._instrument import span_finished, span_started, status_of
from .errors import ProviderTimeout
from .providers import Model, ModelRequest, ModelResponse


async def attempt(
    model: Model,
    request: ModelRequest,
    parent: Span,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 - a per-attempt limit the caller configures
) -> ModelResponse:
    """Send one request to ``model`` and return its answer. The attempt's tokens and cost
    (``None`` when its price is unknown) go on its span and are added to ``parent``'s totals."""
    model_id = model.id
    span = Span("llm", model_id, parent)
    recording = _instrument.recording  # attributes are built only for someone to read them
    if recording:
        # The agent appends to its message list after this attempt: a sink that keeps record
        # objects gets a snapshot (span sinks take what they need at once).
        messages = request.messages if not _instrument._sinks else tuple(request.messages)
        span_started(span, {"model": model_id, "messages": messages})
    try:
        if not model.prepared:
            # Set-up (an SDK import, loading weights) is not the provider being slow: the
            # attempt's timeout starts once it is done. It stays in the attempt's span, as the
            # time the attempt took and, should it fail, as the attempt's error.
            await model.prepare()
        if timeout is None:
            response = await model.request(request)
        else:
            async with asyncio.timeout(timeout):
                response = await model.request(request)
    except TimeoutError as exc:
        error = exc
        if timeout is not None and not isinstance(exc, ProviderTimeout):
            # Our own per-attempt timeout expired (and cancelled the request).
            error = ProviderTimeout(f"no answer within {timeout:g}s", model=model_id)
        span_finished(span, "timed_out", error, attributes={"model": model_id})
        if error is exc:
            raise
        raise error from exc
    except BaseException as exc:
        span_finished(span, status_of(exc), exc, attributes={"model": model_id})
        raise
    result: dict[str, Any] | None = None
    if recording:
        # The model is among the start attributes; what the provider did not say is left out.
        result = {"output": response.text}
        if response.model:
            result["response_model"] = response.model
        if response.finish_reason is not None:
            result["finish_reason"] = response.finish_reason
    span_finished(
        span,
        "completed",
        usage=response.usage,
        cost_usd=model.cost(response.usage),
        attributes=result,
    )
    return response
