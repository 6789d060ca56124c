"""Retry budgets and cost budgets, shared by every call of a workflow run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from kagura import agent, pricing, workflow
from kagura._usage import NO_USAGE
from kagura.errors import ProviderError, RunError, UsageError
from kagura.resilience import BudgetExceeded, CostBudget, Retry, RetryBudget
from kagura.testing import FakeModel, Reply, capture_events, override_model

pytestmark = pytest.mark.usefixtures("no_waits")


def down(n: int) -> list[BaseException]:
    return [ProviderError("down", status_code=503) for _ in range(n)]


class PricedModel(FakeModel):
    """A fake model that is not free: its provider has a registered price."""

    provider = "custom"


@pytest.fixture
def prices(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(pricing, "_user_prices", {})
    pricing._genai_price.cache_clear()
    # $1 per million tokens either way: a call of N tokens costs N / 1e6 dollars.
    pricing.register_price("custom/pricey", input_per_mtok=1.0, output_per_mtok=1.0)
    yield
    pricing._genai_price.cache_clear()


@agent
async def ask(q: str) -> str:
    """{{ q }}"""


# -- retry budgets -------------------------------------------------------------------------


def test_retry_budget_counts() -> None:
    budget = RetryBudget(2)
    assert budget.remaining == 2
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()
    assert budget.used == 2
    assert budget.remaining == 0
    assert "2 of 2" in budget.describe()
    with pytest.raises(UsageError):
        RetryBudget(-1)


async def test_a_workflow_retry_budget_is_shared_by_concurrent_agent_calls() -> None:
    fake = FakeModel(down(50))

    @workflow(retry_budget=2)
    async def fan_out() -> list[object]:
        return await asyncio.gather(*(ask(str(i)) for i in range(3)), return_exceptions=True)

    with override_model(fake), capture_events() as events:
        results = await fan_out()
    # Three first attempts, plus the two retries the budget allowed across all of them.
    assert len(fake.requests) == 5
    assert all(isinstance(r, ProviderError) for r in results)
    notes = [n for r in results for n in getattr(r, "__notes__", [])]
    assert sum("retry budget spent" in n for n in notes) == 3
    assert len([e for e in events.span_events if e.name == "retry_wait"]) == 2
    assert len([e for e in events.span_events if e.name == "retry_budget_exhausted"]) == 3


async def test_a_retry_budget_lets_successes_through() -> None:
    fake = FakeModel([*down(2), "a", "b", "c"])

    @workflow(retry_budget=2)
    async def fan_out() -> list[str]:
        return list(await asyncio.gather(ask("1"), ask("2"), ask("3")))

    with override_model(fake):
        results = await fan_out()
    assert sorted(results) == ["a", "b", "c"]
    assert len(fake.requests) == 5


async def test_the_retry_budget_is_fresh_for_each_run() -> None:
    fake = FakeModel(down(50))

    @workflow(retry_budget=2)
    async def one() -> str:
        return await ask("x")

    with override_model(fake):
        for run in (1, 2):
            with pytest.raises(ProviderError) as caught:
                await one()
            assert len(fake.requests) == 3 * run  # 1 attempt + 2 retries, every run
            assert any("retry budget spent" in n for n in caught.value.__notes__)


async def test_a_zero_retry_budget_means_no_retries() -> None:
    fake = FakeModel(down(5))

    @workflow(retry_budget=0)
    async def one() -> str:
        return await ask("x")

    with override_model(fake), pytest.raises(ProviderError):
        await one()
    assert len(fake.requests) == 1


async def test_a_retry_budget_as_a_context_manager_around_plain_retries() -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise ProviderError("down", status_code=502)

    with RetryBudget(3) as budget:
        results = await asyncio.gather(
            *(Retry(attempts=10).call(flaky) for _ in range(4)), return_exceptions=True
        )
    assert budget.used == 3
    assert calls == 4 + 3
    assert all(isinstance(r, ProviderError) for r in results)


def test_invalid_workflow_budgets_fail_at_decoration() -> None:
    with pytest.raises(UsageError):

        @workflow(retry_budget=-1)
        async def bad() -> None:
            pass

    with pytest.raises(UsageError):

        @workflow(budget_usd=-1.0)
        async def bad_cost() -> None:
            pass


# -- cost budgets --------------------------------------------------------------------------


def test_cost_budget_needs_a_limit() -> None:
    with pytest.raises(UsageError):
        CostBudget()
    with pytest.raises(UsageError):
        CostBudget(tokens=-1)


async def test_a_token_budget_stops_calls_before_the_provider() -> None:
    fake = FakeModel()

    @workflow(budget_tokens=10)
    async def chat() -> list[str]:
        answers = [await ask("one two three four five six")]  # 6 + 6 tokens: spent
        answers.append(await ask("again"))
        return answers

    with override_model(fake), pytest.raises(BudgetExceeded) as caught:
        await chat()
    assert len(fake.requests) == 1  # the second call never reached the model
    assert isinstance(caught.value, RunError)
    assert caught.value.budget.spent_tokens == 12
    assert "token budget" in str(caught.value)


async def test_budget_exceeded_is_not_retried() -> None:
    fake = FakeModel()

    @workflow(budget_tokens=1)
    async def chat() -> str:
        await ask("hello")
        return await ask("hello again")

    with override_model(fake), capture_events() as events, pytest.raises(BudgetExceeded):
        await chat()
    assert not [e for e in events.span_events if e.name == "retry_wait"]


async def test_the_cost_budget_is_fresh_for_each_run() -> None:
    fake = FakeModel()

    @workflow(budget_tokens=10)
    async def single() -> str:
        return await ask("just under the budget")

    with override_model(fake):
        for _ in range(3):
            await single()
    assert len(fake.requests) == 3


async def test_a_usd_budget_with_a_priced_model(prices: None) -> None:
    model = PricedModel(name="pricey")
    assert model.id == "custom/pricey"

    @agent(model=model)
    async def priced(q: str) -> str:
        """{{ q }}"""

    @workflow(budget_usd=0.000005)  # five tokens' worth
    async def chat() -> list[str]:
        return [await priced("a b c"), await priced("d e f")]

    with capture_events() as events, pytest.raises(BudgetExceeded) as caught:
        await chat()
    assert len(model.requests) == 1
    assert caught.value.budget.spent_usd == pytest.approx(6 / 1_000_000)
    assert "cost budget" in str(caught.value)
    (first,) = [s for s in events.spans(kind="agent") if s.status == "completed"]
    assert first.cost_usd == pytest.approx(6 / 1_000_000)


async def test_a_free_model_still_passes_a_usd_budget() -> None:
    fake = FakeModel()

    @workflow(budget_usd=0.0)
    async def chat() -> list[str]:
        return [await ask("a"), await ask("b"), await ask("c")]

    with override_model(fake):
        assert await chat() == ["a", "b", "c"]
    assert len(fake.requests) == 3


async def test_an_unpriced_model_is_counted_not_charged(caplog: pytest.LogCaptureFixture) -> None:
    class Unknown(FakeModel):
        provider = "nobody-prices-this"

    model = Unknown(name="mystery-model-xyz")
    budget = CostBudget(usd=1.0)

    @agent(model=model)
    async def unknown(q: str) -> str:
        """{{ q }}"""

    with budget:
        await unknown("hello")
        await unknown("again")
    assert budget.unpriced_calls == 2
    assert budget.spent_usd == 0.0
    assert budget.spent_tokens == 4
    # Said once, since a USD limit cannot hold calls it cannot price.
    (said,) = [r.getMessage() for r in caplog.records if r.name == "kagura.resilience"]
    assert "a call of unknown price was made under a budget of $1.0" in said
    assert "kagura.pricing.register_price" in said


async def test_fallback_moves_to_a_cheaper_model_when_the_budget_is_spent(prices: None) -> None:
    model = PricedModel(name="pricey")

    @agent(model=model, fallback=["fake/backup"])
    async def priced(q: str) -> str:
        """{{ q }}"""

    @workflow(budget_usd=0.000001)
    async def chat() -> list[str]:
        return [await priced("first question"), await priced("second question")]

    with capture_events() as events:
        assert await chat() == ["first question", "second question"]
    assert len(model.requests) == 1  # the second call went to the free backup
    answered = [s.attributes["answered_by"] for s in events.spans(kind="agent")]
    assert answered == ["custom/pricey", "fake/backup"]
    (fallback,) = [e.attributes for e in events.span_events if e.name == "fallback"]
    assert fallback["failed"] == "custom/pricey"
    assert fallback["next"] == "fake/backup"
    assert "BudgetExceeded" in fallback["error"]


# -- nested budgets ------------------------------------------------------------------------


async def test_a_child_workflow_with_a_budget_of_its_own_is_held_to_its_parents_too(
    prices: None,
) -> None:
    model = PricedModel(name="pricey")

    @agent(model=model)
    async def priced(q: str) -> str:
        """{{ q }}"""

    @workflow(budget_usd=1.0)
    async def child() -> str:
        return await priced("a b c")

    @workflow(budget_usd=0.000005)  # less than one call's $0.000006
    async def parent() -> list[str]:
        return [await child() for _ in range(3)]

    with pytest.raises(BudgetExceeded) as caught:
        await parent()
    assert len(model.requests) == 1
    assert caught.value.budget.usd == 0.000005  # the parent's refused the second call


async def test_a_child_workflow_with_a_retry_budget_of_its_own_is_held_to_its_parents_too() -> None:
    fake = FakeModel(down(5))

    @workflow(retry_budget=5)
    async def child() -> str:
        return await ask("x")

    @workflow(retry_budget=0)
    async def parent() -> str:
        return await child()

    with override_model(fake), pytest.raises(ProviderError) as caught:
        await parent()
    assert len(fake.requests) == 1
    assert "kagura: not retried: retry budget spent (0 of 0 retries used)" in caught.value.__notes__


async def test_a_budget_entered_again_inside_itself_charges_once(prices: None) -> None:
    model = PricedModel(name="pricey")
    budget = CostBudget(usd=1.0)

    @agent(model=model)
    async def priced(q: str) -> str:
        """{{ q }}"""

    with budget, budget:
        await priced("a b c")
    assert budget.spent_usd == pytest.approx(6 / 1_000_000)


async def test_an_answer_without_usage_costs_unknown_not_nothing(prices: None) -> None:
    # A provider that reported no usage: not 0 tokens at $0, which a budget would believe.
    model = PricedModel([Reply("hi", usage=NO_USAGE)], name="pricey")
    budget = CostBudget(usd=1.0)

    @agent(model=model)
    async def priced(q: str) -> str:
        """{{ q }}"""

    with budget, capture_events() as events:
        assert await priced("a b c") == "hi"
    assert (budget.unpriced_calls, budget.spent_usd) == (1, 0.0)
    (llm,) = events.spans(kind="llm")
    (call,) = events.spans(kind="agent")
    assert llm.cost_usd is None and call.cost_usd is None
