"""The one seam every LLM attempt passes through.

Each attempt gets its own ``llm`` span (model, tokens, cost, latency, status). Resilience policies
wrap calls to :func:`attempt`, so every retry is its own recorded attempt.
"""

from __future__ import annotations

from ._context import Span
from ._instrument import span_finished, span_started, status_of
from .pricing import cost_of
from .providers import Model, ModelRequest, ModelResponse


async def attempt(
    model: Model, request: ModelRequest, parent: Span
) -> tuple[ModelResponse, float | None]:
    """Send one request to ``model`` and return its answer and cost (``None`` when unknown)."""
    span = Span("llm", model.id, parent)
    span_started(span, {"model": model.id, "messages": request.messages})
    try:
        response = await model.request(request)
    except BaseException as exc:
        span_finished(span, status_of(exc), exc, attributes={"model": model.id})
        raise
    cost = cost_of(model.provider, model.model_name, response.usage)
    span_finished(
        span,
        "completed",
        usage=response.usage,
        cost_usd=cost,
        attributes={
            "model": model.id,
            "response_model": response.model,
            "output": response.text,
            "finish_reason": response.finish_reason,
        },
    )
    return response, cost
