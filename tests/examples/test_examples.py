"""The advanced workflow examples run end to end on the fake model, and their README code works.

``conditional_workflow`` runs under ``override_model(FakeModel())``. ``parallel_workflow`` and
``retry_workflow`` use model instances of their own (an always-down model, ``FlakyModel`` wrappers)
that ``override_model`` would replace too, hiding the failures they exist to show; those run with
``KAGURA_MODEL=fake`` instead, so that the wrappers wrap the fake model and still fail on script.
The retry example's tests also turn on ``kagura.resilience.set_testing(True)``: the policies'
waits are still computed and printed, but not slept.

``ray_workflow`` starts a Ray cluster, which may only run in a private network namespace: it is
not run here (its README block is only compiled and defined) but by tests/cluster/test_example.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kagura.resilience import set_testing
from kagura.testing import FakeModel, override_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "advanced_workflows"


def load(name: str) -> ModuleType:
    """Import an example script as a module (it is not a package), once."""
    module_name = f"advanced_workflows_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pydantic resolve annotations through it
    spec.loader.exec_module(module)
    return module


def prompts(fake: FakeModel) -> list[str]:
    return [str(r.messages[-1]["content"]) for r in fake.requests]


# ---------------------------------------------------------------------------------------------
# conditional_workflow.py
# ---------------------------------------------------------------------------------------------


async def test_conditional_main_runs_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    example = load("conditional_workflow")
    fake = FakeModel()
    with override_model(fake):
        await example.main()
    out = capsys.readouterr().out
    for n, title in enumerate(
        [
            "Sentiment-based branching",
            "Content type classification",
            "Multi-level conditional logic",
            "Context-aware routing",
            "State machine workflow",
            "Priority-based routing",
        ],
        1,
    ):
        assert f"=== {n}. {title}" in out
    # The fake answers every Literal with its first label.
    assert "sentiment=positive -> positive_responder" in out
    assert "type=question -> answer_question" in out
    assert "4 recent contacts -> human handoff" in out
    assert "translate -> French" in out
    assert "urgent (rule)" in out and "PAGE ON-CALL" in out
    assert fake.requests  # the agents really went through the model


@pytest.mark.parametrize(
    ("label", "responder", "prompt_word"),
    [
        ("positive", "positive_responder", "Thank them"),
        ("negative", "negative_responder", "Apologise"),
        ("neutral", "neutral_responder", "Acknowledge"),
    ],
)
async def test_sentiment_branching_takes_the_labelled_branch(
    label: str, responder: str, prompt_word: str
) -> None:
    example = load("conditional_workflow")
    fake = FakeModel([f'{{"result": "{label}"}}', "a reply"])
    with override_model(fake):
        decision = await example.respond_to_feedback("some feedback")
    assert decision.path == [f"sentiment={label}", responder]
    assert decision.answer == "a reply"
    assert prompt_word in prompts(fake)[1]


async def test_state_machine_revises_then_publishes() -> None:
    example = load("conditional_workflow")
    fake = FakeModel(
        [
            "A short draft.",  # draft_writer
            '{"result": "revise"}',  # reviewer
            "A better short draft.",  # reviser
            '{"result": "approve"}',  # reviewer
        ]
    )
    with override_model(fake):
        decision = await example.publishing_state_machine("a topic")
    assert decision.path == ["draft", "review", "revise", "review", "published"]
    assert decision.answer == "A better short draft."


async def test_state_machine_gives_up_after_max_revisions() -> None:
    example = load("conditional_workflow")
    revise = '{"result": "revise"}'
    fake = FakeModel(["draft", revise, "r1", revise, "r2", revise])
    with override_model(fake):
        decision = await example.publishing_state_machine("a topic", max_revisions=2)
    assert decision.path[-1] == "rejected"
    assert decision.extra["revisions"] == "2"


async def test_priority_rules_skip_the_llm_and_go_first() -> None:
    example = load("conditional_workflow")
    fake = FakeModel(['{"result": "low"}'])  # rate_priority for the only non-urgent ticket
    with override_model(fake):
        handled = await example.priority_router(["Add a dark theme?", "The site is down!"])
    assert [(p, by) for p, by, _, _ in handled] == [("urgent", "rule"), ("low", "llm")]
    assert handled[1][3].startswith("Added to the backlog")  # low priority: no LLM reply
    assert len(fake.requests) == 2  # one rating + one incident notice


# ---------------------------------------------------------------------------------------------
# parallel_workflow.py
# ---------------------------------------------------------------------------------------------


async def test_parallel_main_runs_every_section(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("parallel_workflow")
    await example.main()
    out = capsys.readouterr().out
    for n, title in enumerate(
        [
            "Basic parallel execution",
            "Multi-language translation",
            "Batch processing",
            "Mixed parallel/sequential",
            "Error handling in parallel",
            "Performance comparison",
        ],
        1,
    ):
        assert f"=== {n}. {title}" in out
    assert "FAILED  premium_summary: ProviderError" in out
    assert "HTTP 503" in out
    assert "fail-fast TaskGroup" in out
    assert "sequential (await one by one)" in out and "parallel   (asyncio.gather)" in out
    assert "speed-up" in out


async def test_parallel_analysis_returns_every_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("parallel_workflow")
    result = await example.parallel_analysis("some text")
    assert set(result) == {"sentiment", "keywords", "summary", "language"}
    assert result["sentiment"] == "positive"


# ---------------------------------------------------------------------------------------------
# retry_workflow.py
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def skip_policy_waits() -> Iterator[None]:
    """Retry and rate-limit waits are computed and printed, but not slept."""
    set_testing(True)
    try:
        yield
    finally:
        set_testing(False)


async def test_retry_main_shows_every_failure_mode(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    skip_policy_waits: None,
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    await example.main()
    out = capsys.readouterr().out
    assert "Agents that name no model run on: fake/echo" in out
    for n, title in enumerate(
        [
            "Basic retry with max attempts",
            "Exponential backoff (and jittered, and fixed)",
            "Fallback strategies",
            "Partial retry",
            "Circuit breaker",
            "Graceful degradation",
            "Retry budgets",
            "Timeouts and cancellation",
            "Rate limiting",
            "Hand-written vs library",
        ],
        1,
    ):
        assert f"=== {n}. {title} ===" in out
    # 1. retries with a max (attempt numbers and waits from the on_retry hook), and giving up
    assert (
        "attempt 1 failed (flaky/primary: HTTP 503: injected fault) "
        "-> waiting 0.100 s before attempt 2" in out
    )
    assert "answered on attempt 3" in out
    assert "[kagura: gave up after 3 attempts]" in out
    # 2. exponential, jittered and fixed backoff
    assert "waits 0.050, 0.100, 0.200, 0.400 s" in out
    assert "waiting 0.200 s before attempt 4" in out
    assert out.count("4 attempts (3 failed)") == 3
    # 3. fallbacks: a Fallback chain, its default, and an agent's model fallback
    assert "answered by reliable_agent (degraded=True)" in out
    assert "fast_agent failed first: flaky/fast: HTTP 503" in out
    assert f"answered by default: {example.CANNED_ANSWER}" in out
    assert "model fallback: answered by flaky/backup" in out
    # 4. partial retry: only the failed steps were retried
    assert "model calls: sentiment 1, keywords 2, summary 3" in out
    # 5. circuit breaker: opens, fails fast, probes when half-open, closes
    assert "closed -> open: OPENED" in out
    assert out.count("FAST FAIL: circuit breaker 'backend' is open") == 3
    assert "half_open -> open: the probe failed" in out
    assert "half_open -> closed: the probe succeeded" in out
    assert "9 calls, 6 reached the backend" in out
    # 6. graceful degradation: partial results by a deadline, then levels of answer
    assert "complete=False" in out
    assert "result    sentiment: positive" in out
    assert "error     analysis: ProviderError: flaky/premium: HTTP 503" in out
    assert "cancelled keywords" in out
    for source in ("premium_agent", "basic_agent", "default"):
        assert f"-> answered by {source}:" in out
    # 7. the retry budget runs out
    assert out.count("not retried: retry budget spent (4 of 4 retries used)") == 2
    assert "retry budget ran out: 4 ok, 2 gave up; 10 requests instead of up to 18" in out
    # 8. timeouts and cancellation
    assert "(flaky/slow: no answer within 1s) -> waiting 0.050 s before attempt 2" in out
    assert "answered on attempt 2" in out
    # The total timeout ends the call: as itself, or as the last attempt's ProviderTimeout when the
    # next wait would pass it (both are TimeoutErrors).
    assert "raised TimeoutError" in out or "raised ProviderTimeout" in out
    assert "cancelled after 0.1 s; 1 request, no retry" in out
    # 9. rate limiting: a 429's Retry-After is honoured
    assert "HTTP 429: rate limited, Retry-After 0.5 s) -> waiting 0.500 s" in out
    # 10. the hand-written loop and the library policy behave the same
    assert "fails 2x, library     : 3 attempts, waits [0.05, 0.1], answered" in out
    assert "fails 5x, library     : 3 attempts, waits [0.05, 0.1], raised ProviderError" in out
    assert out.count("same behaviour: True") == 2
    assert "same behaviour: False" not in out


async def test_flaky_model_fails_on_script_and_wraps_the_default_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    example.flaky_primary.script(fail_first=1)
    with pytest.raises(example.ProviderError) as caught:
        await example.single_shot_agent("q")  # retry=False: the fault is not retried
    assert caught.value.status_code == 503
    answer = await example.single_shot_agent("q")
    assert "q" in answer  # the fake model echoes the prompt
    assert (example.flaky_primary.calls, example.flaky_primary.failures) == (2, 1)

    example.flaky_primary.script(fail_first=1, status=429, retry_after=0.5)
    with pytest.raises(example.ProviderError) as caught:
        await example.single_shot_agent("q")
    assert caught.value.status_code == 429
    assert caught.value.retry_after == 0.5


async def test_agent_retry_policy_retries_the_injected_faults(
    monkeypatch: pytest.MonkeyPatch, skip_policy_waits: None
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    example.flaky_primary.script(fail_first=2)
    assert "capital" in await example.unreliable_agent("capital?")
    assert example.flaky_primary.calls == 3


async def test_circuit_breaker_fails_fast_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    breaker = example.backend_breaker
    breaker.reset()
    example.flaky_backend.script(fail_first=3)
    for _ in range(3):
        with pytest.raises(example.ProviderError):
            await example.backend_agent("x")
    assert breaker.state == "open"
    with pytest.raises(example.CircuitOpenError):
        await example.backend_agent("x")
    assert example.flaky_backend.calls == 3  # the fast failure never reached the model
    await asyncio.sleep(breaker.recovery_time + 0.02)
    assert breaker.state == "half_open"
    await example.backend_agent("x")  # the probe succeeds
    assert breaker.state == "closed"


async def test_retry_budget_is_shared_by_the_concurrent_calls_of_a_run(
    monkeypatch: pytest.MonkeyPatch, skip_policy_waits: None
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    example.flaky_batch.script(fail_first=6)
    outcomes = await example.label_batch([f"item {n}" for n in range(6)])
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failed) == 2
    assert all("retry budget spent (4 of 4 retries used)" in example.notes(e) for e in failed)
    assert example.flaky_batch.calls == 10
    # Each run gets a fresh budget.
    example.flaky_batch.script(fail_first=4)
    outcomes = await example.label_batch([f"item {n}" for n in range(4)])
    assert not any(isinstance(o, Exception) for o in outcomes)


# ---------------------------------------------------------------------------------------------
# README.md
# ---------------------------------------------------------------------------------------------

README = EXAMPLES / "README.md"
CODE_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_readme_has_python_blocks() -> None:
    assert len(CODE_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(CODE_BLOCKS)))
def test_readme_python_block_runs(
    index: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every block compiles; the complete programs (with a ``__main__`` guard) also run, except
    those on Ray: these only define what they define, for Ray must start in a private network
    namespace (tests/cluster/test_example.py runs ray_workflow.py there)."""
    source = CODE_BLOCKS[index]
    code = compile(source, f"README.md block {index + 1}", "exec")
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    on_ray = "kagura.ray" in source
    if on_ray:
        pytest.importorskip("ray")
    as_program = "__main__" in source and not on_ray
    namespace = {"__name__": "__main__" if as_program else f"readme_block_{index}"}
    exec(code, namespace)
    if as_program:
        assert capsys.readouterr().out.strip()  # the program printed its result
