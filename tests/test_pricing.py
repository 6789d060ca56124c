"""What calls cost: genai-prices for known models, ``None`` (never 0) for unknown ones."""

from __future__ import annotations

import pytest

from kagura import Usage, agent, pricing
from kagura.testing import FakeModel, Reply, capture_events

USAGE = Usage(prompt_tokens=1_000, completion_tokens=500)


@pytest.fixture(autouse=True)
def _no_registered_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pricing, "_user_prices", {})


class PricedFake(FakeModel):
    """A scripted model that is priced like a paid provider."""

    provider = "acme"


def test_known_model_is_priced_from_genai_prices() -> None:
    cost = pricing.cost_of("openai", "gpt-4o-mini", USAGE)
    assert isinstance(cost, float)
    assert cost > 0
    bigger = pricing.cost_of("openai", "gpt-4o-mini", USAGE + USAGE)
    assert bigger == pytest.approx(2 * cost)
    # Output tokens cost more than input tokens on this model.
    only_in = pricing.cost_of("openai", "gpt-4o-mini", Usage(1_000, 0))
    only_out = pricing.cost_of("openai", "gpt-4o-mini", Usage(0, 1_000))
    assert only_in is not None and only_out is not None
    assert 0 < only_in < only_out


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "no-such-model-xyz"), ("acme", "mystery-1"), ("ollama", "llama3.2")],
)
def test_unknown_model_costs_none_not_zero(provider: str, model: str) -> None:
    assert pricing.cost_of(provider, model, USAGE) is None


def test_register_price_makes_a_model_known() -> None:
    assert pricing.cost_of("acme", "mystery-1", USAGE) is None
    pricing.register_price("mystery-1", input_per_mtok=2.0, output_per_mtok=8.0)
    assert pricing.cost_of("acme", "mystery-1", USAGE) == pytest.approx(
        (1_000 * 2.0 + 500 * 8.0) / 1_000_000
    )


def test_register_price_per_provider_and_override() -> None:
    pricing.register_price("acme/mystery-2", input_per_mtok=1.0, output_per_mtok=1.0)
    assert pricing.cost_of("acme", "mystery-2", Usage(1_000_000, 0)) == pytest.approx(1.0)
    assert pricing.cost_of("other", "mystery-2", Usage(1_000_000, 0)) is None
    # A registered price also overrides genai-prices.
    pricing.register_price("openai/gpt-4o-mini", input_per_mtok=100.0, output_per_mtok=0.0)
    assert pricing.cost_of("openai", "gpt-4o-mini", Usage(10_000, 0)) == pytest.approx(1.0)


def test_negative_prices_are_rejected() -> None:
    with pytest.raises(ValueError):
        pricing.register_price("x", input_per_mtok=-1, output_per_mtok=0)


@pytest.mark.parametrize(("provider", "model"), [("local", "smollm2"), ("fake", "echo")])
def test_local_and_fake_models_are_free(provider: str, model: str) -> None:
    cost = pricing.cost_of(provider, model, USAGE)
    assert cost == 0.0
    assert cost is not None


async def test_agent_span_carries_usage_and_summed_cost() -> None:
    pricing.register_price("acme/priced", input_per_mtok=1.0, output_per_mtok=2.0)
    fake = PricedFake(
        [Reply("not json", usage=Usage(100, 10)), Reply("7", usage=Usage(200, 20))], name="priced"
    )

    @agent(model=fake)
    async def count(text: str) -> int:
        """{{ text }}"""

    with capture_events() as events:
        assert await count("x") == 7
    (span,) = events.spans(kind="agent")
    assert span.usage == Usage(300, 30)
    assert span.cost_usd == pytest.approx((300 * 1.0 + 30 * 2.0) / 1_000_000)
    attempts = events.spans(kind="llm")
    assert [a.cost_usd for a in attempts] == pytest.approx([120e-6, 240e-6])


async def test_agent_cost_is_unknown_when_any_attempt_is_unpriced() -> None:
    # The first attempt used no tokens (cost 0), the second is unpriced: the total is unknown.
    fake = PricedFake(
        [Reply("not json", usage=Usage(0, 0)), Reply("7", usage=Usage(5, 1))], name="unpriced"
    )

    @agent(model=fake)
    async def count(text: str) -> int:
        """{{ text }}"""

    with capture_events() as events:
        assert await count("x") == 7
    (span,) = events.spans(kind="agent")
    assert span.usage == Usage(5, 1)
    assert span.cost_usd is None
    assert [a.cost_usd for a in events.spans(kind="llm")] == [0.0, None]


async def test_fake_agent_costs_zero() -> None:
    @agent(model=FakeModel(["hello"]))
    async def greet(name: str) -> str:
        """Greet {{ name }}"""

    with capture_events() as events:
        await greet("Ada")
    (span,) = events.spans(kind="agent")
    assert span.cost_usd == 0.0
    assert span.usage is not None and span.usage.total_tokens > 0


def test_unregister_price_makes_the_model_unknown_again() -> None:
    pricing.register_price("house-model", input_per_mtok=1.0, output_per_mtok=2.0)
    assert pricing.cost_of("acme", "house-model", USAGE) == pytest.approx(0.002)
    pricing.unregister_price("house-model")
    assert pricing.cost_of("acme", "house-model", USAGE) is None


async def test_a_model_wrapper_can_answer_for_its_own_price() -> None:
    class Wrapper(FakeModel):
        provider = "wrapper"

        def cost(self, usage: Usage) -> float | None:
            return 0.5  # e.g. delegate to the wrapped model

    @agent(model=Wrapper(["hi"]))
    async def hello(x: str) -> str:
        """{{ x }}"""

    assert (await hello.run("x")).cost_usd == 0.5
