"""The advanced workflow examples run end to end on the fake model, and their README code works.

``conditional_workflow`` runs under ``override_model(FakeModel())``. ``parallel_workflow`` and
``retry_workflow`` use model instances of their own (an always-down model, ``FlakyModel`` wrappers)
that ``override_model`` would replace too, hiding the failures they exist to show; those run with
``KAGURA_MODEL=fake`` instead, so that the wrappers wrap the fake model and still fail on script.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

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


async def test_retry_main_shows_every_failure_mode(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    await example.main()
    out = capsys.readouterr().out
    assert "Agents that name no model run on: fake/echo" in out
    # 1. retries with a max, and giving up
    assert "attempt 1/3 failed: flaky/primary: HTTP 503: injected fault" in out
    assert "attempt 3/3 succeeded" in out
    assert "gave up after 3 attempts" in out
    # 2. exponential backoff
    assert "attempt 4/5 succeeded" in out
    assert "4 attempts (3 failed)" in out
    # 3. fallbacks
    assert "answered by reliable_agent (fallback)" in out
    assert "answered by canned answer (last-resort fallback)" in out
    # 4. partial retry
    assert "partial results so far: ['sentiment']; failed: ['keywords', 'summary']" in out
    assert "round 3: running summary" in out
    assert "model calls: keywords 2, summary 3" in out
    # 5. circuit breaker
    assert "circuit breaker OPENED" in out
    assert out.count("FAST FAIL") == 2
    assert "half-open" in out
    assert "7 calls, 5 reached the backend" in out
    # 6. graceful degradation
    for level in ("full", "basic", "minimal"):
        assert f"level={level}" in out
    # 7. retry budget
    assert "retry budget exhausted" in out
    assert "retries used 3/3" in out


async def test_flaky_model_fails_on_script_and_wraps_the_default_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    example.flaky_primary.script(fail_first=1)
    with pytest.raises(example.ProviderError) as caught:
        await example.unreliable_agent("q")
    assert caught.value.status_code == 503
    answer = await example.unreliable_agent("q")
    assert "q" in answer  # the fake model echoes the prompt
    assert (example.flaky_primary.calls, example.flaky_primary.failures) == (2, 1)


async def test_circuit_breaker_fails_fast_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    example = load("retry_workflow")
    breaker = example.CircuitBreaker(failure_threshold=2, reset_timeout=0.05)
    example.flaky_backend.script(fail_first=2)
    for _ in range(2):
        with pytest.raises(example.ProviderError):
            await breaker.call(lambda: example.backend_agent("x"))
    assert breaker.state == "open"
    with pytest.raises(example.CircuitOpenError):
        await breaker.call(lambda: example.backend_agent("x"))
    assert example.flaky_backend.calls == 2  # the fast failure never reached the model
    await asyncio.sleep(0.06)
    await breaker.call(lambda: example.backend_agent("x"))
    assert breaker.state == "closed"


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
    """Every block compiles; the complete programs (with a ``__main__`` guard) also run."""
    source = CODE_BLOCKS[index]
    code = compile(source, f"README.md block {index + 1}", "exec")
    monkeypatch.setenv("KAGURA_MODEL", "fake")
    namespace = {"__name__": "__main__" if "__main__" in source else f"readme_block_{index}"}
    exec(code, namespace)
    if "__main__" in source:
        assert capsys.readouterr().out.strip()  # the program printed its result
