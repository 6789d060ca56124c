"""Parallel execution with Kagura workflows: agents are coroutines, so asyncio runs them at once.

Sections:

1. Basic parallel execution (``asyncio.gather`` over independent agents)
2. Multi-language translation (one agent, many arguments)
3. Batch processing (gather over a list, with a semaphore bounding concurrency)
4. Mixed parallel/sequential (fan out, join, then continue with the joined results)
5. Error handling in parallel (``return_exceptions=True``, timeouts, and a fail-fast TaskGroup)
6. Performance comparison (the same calls sequentially and with ``asyncio.gather``)

Every agent call inside a ``@workflow`` joins that workflow's run, including calls made inside
``asyncio.gather``, ``create_task`` and ``TaskGroup``.

Run it (no API key needed: agents that name no model run on the embedded SmolLM2-135M model):

    python examples/advanced_workflows/parallel_workflow.py
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import Field

from kagura import ProviderError, RunError, agent, workflow
from kagura.providers import Model, ModelRequest, ModelResponse, resolve_model


def short(text: object, limit: int = 80) -> str:
    """One line, at most ``limit`` characters: small models can ramble."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def header(title: str) -> None:
    print(f"\n=== {title} ===")


# ---------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------

Sentiment = Literal["positive", "negative", "neutral"]
# At most 3 keywords of at most 24 characters: the constraints go into the JSON schema.
Keywords = Annotated[list[Annotated[str, Field(max_length=24)]], Field(max_length=3)]


@agent(max_tokens=16, temperature=0)
async def sentiment_analyzer(text: str) -> Sentiment:
    """Is the sentiment of this text positive, negative or neutral? Text: {{ text }}"""


@agent(max_tokens=48, temperature=0)
async def keyword_extractor(text: str) -> Keywords:
    """List up to three keywords of this text: {{ text }}"""


@agent(max_tokens=48, temperature=0)
async def summarizer(text: str) -> str:
    """Summarise in one sentence: {{ text }}"""


@agent(max_tokens=16, temperature=0)
async def language_detector(text: str) -> str:
    """Which language is this text written in? Answer with one word. Text: {{ text }}"""


@agent(max_tokens=48)
async def translator(text: str, language: str) -> str:
    """Translate into {{ language }}: {{ text }}"""


@agent(max_tokens=96)
async def long_writer(text: str) -> str:
    """Write a detailed essay about: {{ text }}"""


class OfflineModel(Model):
    """Stands in for a provider that is down: every request fails with HTTP 503."""

    provider = "offline"
    model_name = "premium"

    async def request(self, request: ModelRequest) -> ModelResponse:
        await asyncio.sleep(0.01)
        raise ProviderError("service unavailable", model=self.id, status_code=503)


# Kagura agents retry transient errors (429, 5xx) by themselves; retry=False makes this one fail
# at once, so the error handling below has a failure to handle.
@agent(model=OfflineModel(), retry=False, max_tokens=48)
async def premium_summarizer(text: str) -> str:
    """Summarise in one sentence: {{ text }}"""


# ---------------------------------------------------------------------------------------------
# Workflows
# ---------------------------------------------------------------------------------------------


@workflow
async def parallel_analysis(text: str) -> dict[str, Any]:
    """1. Run four independent analyses at once."""
    sentiment, keywords, summary, language = await asyncio.gather(
        sentiment_analyzer(text),
        keyword_extractor(text),
        summarizer(text),
        language_detector(text),
    )
    return {"sentiment": sentiment, "keywords": keywords, "summary": summary, "language": language}


@workflow
async def translate_all(text: str, languages: list[str]) -> dict[str, str]:
    """2. One agent, many arguments: results come back in the order of ``languages``."""
    translations = await asyncio.gather(*(translator(text, lang) for lang in languages))
    return dict(zip(languages, translations, strict=True))


@workflow
async def batch_classify(reviews: list[str], max_concurrency: int = 2) -> list[Sentiment]:
    """3. Classify a batch; the semaphore keeps at most ``max_concurrency`` calls in flight.

    Bounding concurrency matters with hosted APIs (rate limits) and large batches; with the
    embedded model, calls beyond its worker count simply queue.
    """
    gate = asyncio.Semaphore(max_concurrency)

    async def classify(review: str) -> Sentiment:
        async with gate:
            return await sentiment_analyzer(review)

    return await asyncio.gather(*(classify(r) for r in reviews))


@workflow
async def hybrid_workflow(text: str, languages: list[str]) -> dict[str, Any]:
    """4. Parallel analysis, then a sequential step that needs it, then parallel again."""
    # Phase 1 (parallel): independent analyses
    sentiment, keywords = await asyncio.gather(sentiment_analyzer(text), keyword_extractor(text))
    # Phase 2 (sequential): uses the results of phase 1
    enriched = f"{text}\n(The tone is {sentiment}; key points: {', '.join(keywords) or 'none'}.)"
    summary = await summarizer(enriched)
    # Phase 3 (parallel): fan the summary out to every language
    translations = await asyncio.gather(*(translator(summary, lang) for lang in languages))
    return {
        "sentiment": sentiment,
        "keywords": keywords,
        "summary": summary,
        "translations": dict(zip(languages, translations, strict=True)),
    }


@workflow
async def resilient_fanout(text: str, timeout: float = 0.05) -> dict[str, Any]:
    """5. Gather with ``return_exceptions=True``: one failure does not lose the other results."""
    names = ["sentiment", "keywords", "premium_summary", "essay"]
    outcomes = await asyncio.gather(
        sentiment_analyzer(text),
        keyword_extractor(text),
        premium_summarizer(text),  # its provider is down: raises ProviderError
        asyncio.wait_for(long_writer(text), timeout=timeout),  # too slow: TimeoutError
        return_exceptions=True,
    )
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome  # never swallow a cancellation of the workflow itself
        if isinstance(outcome, TimeoutError):
            errors[name] = f"TimeoutError: no answer within {timeout} s (the call was cancelled)"
        elif isinstance(outcome, RunError):
            errors[name] = f"{type(outcome).__name__}: {outcome}"
        elif isinstance(outcome, BaseException):
            raise outcome  # a bug, not a run failure: let it surface
        else:
            results[name] = outcome
    return {"results": results, "errors": errors}


@workflow
async def all_or_nothing(text: str) -> dict[str, Any]:
    """5b. Fail fast: a TaskGroup cancels the sibling tasks as soon as one fails."""
    async with asyncio.TaskGroup() as group:
        summary = group.create_task(premium_summarizer(text))
        essay = group.create_task(long_writer(text))
    return {"summary": summary.result(), "essay": essay.result()}


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------

ARTICLE = (
    "The city opened a new riverside park on Saturday. Families enjoyed the playgrounds, "
    "but some residents complained about the lack of parking."
)
LANGUAGES = ["French", "Spanish", "German", "Japanese"]
REVIEWS = [
    "Fantastic battery life, I am very happy.",
    "Stopped working after a week. Very disappointed.",
    "It is a phone case. It fits the phone.",
    "Best purchase I made this year!",
    "The screen cracked on the first drop.",
    "Delivery took five days.",
]


def local_workers() -> int:
    """How many generations the embedded model runs at once (see kagura.providers.local)."""
    return int(os.environ.get("KAGURA_LOCAL_WORKERS", min(2, os.cpu_count() or 1)))


def describe_model() -> Model:
    model = resolve_model(None)
    print(f"Agents that name no model run on: {model.id}")
    if model.provider == "local":
        print(
            f"  (the embedded SmolLM2-135M: tiny, fast, not smart; it runs up to "
            f"{local_workers()} generations at once on {os.cpu_count()} CPU cores)"
        )
    return model


async def performance_comparison(model: Model) -> None:
    texts = [
        "Solar panels turn sunlight into electricity.",
        "Bees pollinate many of the crops we eat.",
        "The printing press spread books across Europe.",
        "Glaciers store most of the world's fresh water.",
    ]
    # Warm up: the embedded model loads once per worker thread; keep that out of the timings.
    await asyncio.gather(*(summarizer(t) for t in texts[:2]))

    start = time.perf_counter()
    sequential = [await summarizer(t) for t in texts]
    sequential_s = time.perf_counter() - start

    start = time.perf_counter()
    parallel = await asyncio.gather(*(summarizer(t) for t in texts))
    parallel_s = time.perf_counter() - start

    same = "same answers" if sequential == parallel else "answers differ"
    print(f"  {len(texts)} summaries, temperature=0 ({same}):")
    print(f"  sequential (await one by one): {sequential_s:6.2f} s")
    print(f"  parallel   (asyncio.gather):   {parallel_s:6.2f} s")
    if parallel_s > 0.001:
        print(f"  speed-up: {sequential_s / parallel_s:.2f}x")
    else:
        print("  speed-up: n/a (the model answers instantly)")
    if model.provider == "local":
        workers = local_workers()
        print(
            f"  Note: the embedded model runs at most {workers} generation(s) at once "
            f"(KAGURA_LOCAL_WORKERS={workers}) and shares {os.cpu_count()} CPU core(s) between "
            "them,\n  so the speed-up is real but modest here. With a hosted API "
            "(e.g. OPENAI_API_KEY) the calls overlap\n  almost completely and the speed-up "
            f"approaches the number of calls ({len(texts)}x)."
        )
    else:
        print(
            f"  Note: with a hosted API the speed-up approaches the number of calls "
            f"({len(texts)}x), until rate limits apply."
        )


async def main() -> None:
    started = time.perf_counter()
    model = describe_model()

    header("1. Basic parallel execution")
    start = time.perf_counter()
    analysis = await parallel_analysis(ARTICLE)
    for key, value in analysis.items():
        print(f"  {key:>9}: {short(value)}")
    print(f"  (4 agents in {time.perf_counter() - start:.2f} s)")

    header("2. Multi-language translation")
    start = time.perf_counter()
    for language, text in (await translate_all("Good morning, how are you?", LANGUAGES)).items():
        print(f"  {language:>9}: {short(text)}")
    print(f"  ({len(LANGUAGES)} translations in {time.perf_counter() - start:.2f} s)")

    header("3. Batch processing")
    start = time.perf_counter()
    labels = await batch_classify(REVIEWS, max_concurrency=2)
    for review, label in zip(REVIEWS, labels, strict=True):
        print(f"  {label:>8}  {review}")
    print(f"  counts: {dict(Counter(labels))}")
    print(f"  ({len(REVIEWS)} reviews, at most 2 in flight, {time.perf_counter() - start:.2f} s)")

    header("4. Mixed parallel/sequential")
    hybrid = await hybrid_workflow(ARTICLE, ["French", "Spanish"])
    print(f"  phase 1 (parallel):   sentiment={hybrid['sentiment']}, keywords={hybrid['keywords']}")
    print(f"  phase 2 (sequential): summary={short(hybrid['summary'])}")
    for language, text in hybrid["translations"].items():
        print(f"  phase 3 (parallel):   {language}: {short(text, 60)}")

    header("5. Error handling in parallel")
    outcome = await resilient_fanout(ARTICLE)
    for name, value in outcome["results"].items():
        print(f"  ok      {name:>15}: {short(value, 60)}")
    for name, error in outcome["errors"].items():
        print(f"  FAILED  {name:>15}: {short(error, 90)}")
    print(
        f"  -> {len(outcome['results'])} results kept, {len(outcome['errors'])} failures reported"
    )
    try:
        await all_or_nothing(ARTICLE)
    except* ProviderError as group:
        print(f"  fail-fast TaskGroup: {short(group.exceptions[0], 70)}")
        print("    -> the TaskGroup cancelled the other task (long_writer) instead of waiting")

    header("6. Performance comparison: sequential vs asyncio.gather")
    await performance_comparison(model)

    print(f"\nDone in {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    asyncio.run(main())
