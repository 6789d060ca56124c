"""What LLM calls cost, in USD.

Prices come from ``genai-prices`` (a data package, looked up offline). Models it does not know
can be priced with :func:`register_price`. A price that cannot be found is reported as ``None``
(unknown), never as 0; models run on your own machine (``local/...``) and fakes cost 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from ._usage import Usage

__all__ = ["ModelPrice", "cost_of", "register_price", "unregister_price"]

_log = logging.getLogger("kagura.pricing")

_FREE_PROVIDERS = frozenset({"local", "fake"})
# Kagura endpoint names that genai-prices knows under another id.
_GENAI_PROVIDER_IDS = {"openai": "openai", "openrouter": "openrouter"}


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, usage: Usage) -> float:
        """The USD cost of ``usage`` at this price."""
        return (
            usage.prompt_tokens * self.input_per_mtok
            + usage.completion_tokens * self.output_per_mtok
        ) / 1_000_000


_user_prices: dict[str, ModelPrice] = {}


def register_price(model: str, *, input_per_mtok: float, output_per_mtok: float) -> None:
    """Price a model genai-prices does not know (or override it).

    ``model`` is either the bare model name (``"my-model"``) or ``"provider/model"``.
    """
    if input_per_mtok < 0 or output_per_mtok < 0:
        raise ValueError("prices must not be negative")
    _user_prices[model] = ModelPrice(input_per_mtok, output_per_mtok)
    _genai_price.cache_clear()


def unregister_price(model: str) -> None:
    """Forget a price set with :func:`register_price` (genai-prices' own applies again)."""
    _user_prices.pop(model, None)
    _genai_price.cache_clear()


def is_free(provider: str) -> bool:
    """Models that run on this machine (or fakes): they cost nothing, whatever their usage."""
    return provider in _FREE_PROVIDERS


def cost_of(provider: str, model_name: str, usage: Usage) -> float | None:
    """Cost in USD of ``usage`` on this model, or ``None`` when no price is known."""
    if is_free(provider):
        return 0.0
    user = _user_prices.get(f"{provider}/{model_name}") or _user_prices.get(model_name)
    if user is not None:
        return user.cost(usage)
    if usage.total_tokens == 0:
        return 0.0
    return _genai_price(provider, model_name, usage.prompt_tokens, usage.completion_tokens)


def load() -> None:
    """Imports genai-prices and loads its table of prices, as its first price would otherwise
    do: some 1.6 MB of Python, 50 to 300 ms during which the event loop that priced an answer
    ran nothing else. The providers that price their answers call it off the loop, where they import
    what their first request needs."""
    # Any lookup loads the whole table (whatever genai-prices names the module it is in). Zero
    # tokens: cost_of never asks for those, so the entry it leaves in the cache is never read.
    _genai_price("openai", "gpt-4o-mini", 0, 0)


@lru_cache(maxsize=4096)
def _genai_price(provider: str, model_name: str, prompt: int, completion: int) -> float | None:
    try:
        import genai_prices
    except ImportError:  # pragma: no cover - it is a hard dependency
        return None
    try:
        price = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=prompt, output_tokens=completion),
            model_ref=model_name,
            provider_id=_GENAI_PROVIDER_IDS.get(provider),
        )
    except LookupError:
        return None
    except Exception:
        _log.debug("genai-prices failed for %s/%s", provider, model_name, exc_info=True)
        return None
    return float(price.total_price)
