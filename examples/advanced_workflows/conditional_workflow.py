"""Conditional branching and routing with Kagura workflows.

A workflow is plain async Python, so routing is plain ``if``/``match``. The trick that keeps it
well-defined is to let classifier agents return a ``Literal``: the answer is always one of the
labels you branch on, whatever the model says (Kagura validates it, and the embedded model is even
grammar-constrained to it).

Sections:

1. Sentiment-based branching
2. Content type classification (a dispatch table of handler agents)
3. Multi-level conditional logic (nested decisions, LLM labels combined with plain rules)
4. Context-aware routing (the same message, routed differently per user)
5. State machine workflow (draft -> review -> revise -> ... -> published / rejected)
6. Priority-based routing (rules first, LLM second, then handle in priority order)

Run it (no API key needed: agents that name no model run on the embedded SmolLM2-135M model):

    python examples/advanced_workflows/conditional_workflow.py
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

from kagura import agent, workflow
from kagura.providers import resolve_model


@dataclass
class Decision:
    """What a routing workflow decided (the path it took) and the answer it produced."""

    path: list[str]
    answer: str
    llm_calls: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def short(text: object, limit: int = 90) -> str:
    """One line, at most ``limit`` characters: small models can ramble."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def header(title: str) -> None:
    print(f"\n=== {title} ===")


# ---------------------------------------------------------------------------------------------
# 1. Sentiment-based branching
# ---------------------------------------------------------------------------------------------

Sentiment = Literal["positive", "negative", "neutral"]


@agent(max_tokens=16, temperature=0)
async def sentiment_analyzer(text: str) -> Sentiment:
    """Is the sentiment of this customer message positive, negative or neutral?
    Message: {{ text }}"""


@agent(max_tokens=48)
async def positive_responder(text: str) -> str:
    """A customer wrote: "{{ text }}". Thank them warmly in one short sentence."""


@agent(max_tokens=48)
async def negative_responder(text: str) -> str:
    """A customer wrote: "{{ text }}". Apologise and offer help in one short sentence."""


@agent(max_tokens=48)
async def neutral_responder(text: str) -> str:
    """A customer wrote: "{{ text }}". Acknowledge it and ask how you can help, in one sentence."""


@workflow
async def respond_to_feedback(text: str) -> Decision:
    """Classify the sentiment, then answer with the responder made for it."""
    sentiment = await sentiment_analyzer(text)
    match sentiment:
        case "positive":
            reply = await positive_responder(text)
            route = "positive_responder"
        case "negative":
            reply = await negative_responder(text)
            route = "negative_responder"
        case _:
            reply = await neutral_responder(text)
            route = "neutral_responder"
    return Decision([f"sentiment={sentiment}", route], reply)


# ---------------------------------------------------------------------------------------------
# 2. Content type classification: a dispatch table instead of an if/elif chain
# ---------------------------------------------------------------------------------------------

ContentType = Literal["question", "code", "complaint", "other"]


@agent(max_tokens=16, temperature=0)
async def classify_content(text: str) -> ContentType:
    """Is this message a question, a piece of code, a complaint, or other?
    Message: {{ text }}"""


@agent(max_tokens=48)
async def answer_question(text: str) -> str:
    """Answer this question in one short sentence: {{ text }}"""


@agent(max_tokens=48)
async def explain_code(text: str) -> str:
    """Explain in one sentence what this code does: {{ text }}"""


@agent(max_tokens=48)
async def handle_complaint(text: str) -> str:
    """Reply to this complaint politely in one sentence: {{ text }}"""


@agent(max_tokens=48)
async def general_handler(text: str) -> str:
    """Reply briefly and helpfully to: {{ text }}"""


# One handler per label: adding a label to ContentType means adding its handler here.
CONTENT_HANDLERS = {
    "question": answer_question,
    "code": explain_code,
    "complaint": handle_complaint,
    "other": general_handler,
}


@workflow
async def route_content(text: str) -> Decision:
    kind = await classify_content(text)
    handler = CONTENT_HANDLERS[kind]
    answer = await handler(text)
    return Decision([f"type={kind}", handler.name], answer)


# ---------------------------------------------------------------------------------------------
# 3. Multi-level conditional logic
# ---------------------------------------------------------------------------------------------

Department = Literal["technical", "billing", "account"]
Plan = Literal["free", "pro", "enterprise"]


@agent(max_tokens=16, temperature=0)
async def classify_department(message: str) -> Department:
    """Which team should handle this support message: technical, billing or account?
    Message: {{ message }}"""


@agent(max_tokens=16, temperature=0)
async def rate_severity(message: str) -> Literal["minor", "major"]:
    """Is this technical problem minor or major? Problem: {{ message }}"""


@agent(max_tokens=16, temperature=0)
async def is_refund_request(message: str) -> bool:
    """Does this customer ask for their money back? Message: {{ message }}"""


@agent(max_tokens=48)
async def troubleshooting_steps(message: str) -> str:
    """Suggest one troubleshooting step for: {{ message }}"""


@agent(max_tokens=48)
async def escalation_note(message: str) -> str:
    """Write a one-sentence note for the on-call engineer about: {{ message }}"""


@agent(max_tokens=48)
async def billing_reply(message: str, refund: bool) -> str:
    """Reply in one sentence to this billing message: {{ message }}
    {% if refund %}Say that a refund request has been opened.{% endif %}"""


@workflow
async def support_triage(message: str, plan: Plan) -> Decision:
    """Level 1: department (LLM). Level 2: severity or refund (LLM). Level 3: the plan (a rule)."""
    path: list[str] = []
    calls = 1
    department = await classify_department(message)
    path.append(f"department={department}")

    if department == "technical":
        severity = await rate_severity(message)
        calls += 1
        path.append(f"severity={severity}")
        if severity == "major" and plan == "enterprise":
            path.append("enterprise SLA -> page on-call")
            answer = await escalation_note(message)
        elif severity == "major":
            path.append("major -> priority ticket")
            answer = await troubleshooting_steps(message)
        else:
            path.append("minor -> self-service")
            answer = await troubleshooting_steps(message)
        calls += 1
    elif department == "billing":
        refund = await is_refund_request(message)
        calls += 1
        path.append(f"refund={refund}")
        # Plain rules can override the model: free plans have nothing to refund.
        if refund and plan == "free":
            path.append("free plan -> nothing to refund")
            refund = False
        answer = await billing_reply(message, refund)
        calls += 1
    else:
        # No LLM needed at all for the account branch: a canned answer is cheaper and exact.
        path.append("account -> canned reset link")
        answer = "You can reset your password at https://example.com/reset."
    return Decision(path, answer, llm_calls=calls)


# ---------------------------------------------------------------------------------------------
# 4. Context-aware routing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserContext:
    name: str
    tier: Literal["free", "pro"]
    language: str
    recent_contacts: int


Intent = Literal["how_to", "bug_report", "feedback"]


@agent(max_tokens=16, temperature=0)
async def classify_intent(message: str) -> Intent:
    """Is this message a how_to question, a bug_report or feedback? Message: {{ message }}"""


@agent(max_tokens=32)
async def quick_answer(message: str) -> str:
    """Answer in one short sentence: {{ message }}"""


@agent(max_tokens=80, system="You are a senior support engineer. Be precise.")
async def expert_answer(message: str, intent: str) -> str:
    """A premium customer sent a {{ intent }} message: {{ message }}
    Give a precise answer in two sentences."""


@agent(max_tokens=64)
async def translate(text: str, language: str) -> str:
    """Translate into {{ language }}: {{ text }}"""


@agent(max_tokens=48)
async def handoff_summary(message: str, contacts: int) -> str:
    """Summarise for a human agent, in one sentence, this message from a customer who has
    contacted us {{ contacts }} times this week: {{ message }}"""


@workflow
async def context_router(message: str, user: UserContext) -> Decision:
    """Route on who is asking (tier, language, history) as well as on what they ask."""
    path: list[str] = []
    if user.recent_contacts >= 3:
        # Repeated contact: skip the bots, hand over to a human with a summary.
        path.append(f"{user.recent_contacts} recent contacts -> human handoff")
        return Decision(path, await handoff_summary(message, user.recent_contacts))

    intent = await classify_intent(message)
    path.append(f"intent={intent}")
    if user.tier == "pro":
        path.append("pro tier -> expert_answer")
        answer = await expert_answer(message, intent)
    else:
        path.append("free tier -> quick_answer")
        answer = await quick_answer(message)
    if user.language != "English":
        path.append(f"translate -> {user.language}")
        answer = await translate(answer, user.language)
    return Decision(path, answer)


# ---------------------------------------------------------------------------------------------
# 5. State machine workflow
# ---------------------------------------------------------------------------------------------

State = Literal["draft", "review", "revise", "published", "rejected"]
Verdict = Literal["approve", "revise", "reject"]
NEXT_STATE: dict[Verdict, State] = {
    "approve": "published",
    "revise": "revise",
    "reject": "rejected",
}
MAX_WORDS = 30  # a house rule the reviewer agent cannot overrule


@agent(max_tokens=64)
async def draft_writer(topic: str) -> str:
    """Write a short product announcement about: {{ topic }}"""


@agent(max_tokens=16, temperature=0)
async def reviewer(draft: str) -> Verdict:
    """Review this announcement. Answer approve, revise or reject.
    Announcement: {{ draft }}"""


@agent(max_tokens=32)
async def reviser(draft: str) -> str:
    """Rewrite this announcement as one sentence of at most 20 words: {{ draft }}"""


@workflow
async def publishing_state_machine(topic: str, max_revisions: int = 2) -> Decision:
    """An explicit state machine: each state does one thing and names the next state."""
    state: State = "draft"
    path: list[str] = [state]
    draft = ""
    revisions = 0
    calls = 0
    while state not in ("published", "rejected"):
        match state:
            case "draft":
                draft = await draft_writer(topic)
                calls += 1
                state = "review"
            case "review":
                verdict = await reviewer(draft)
                calls += 1
                words = len(draft.split())
                if verdict == "approve" and words > MAX_WORDS:
                    verdict = "revise"  # the rule wins over the model
                    path.append(f"[{words} words > {MAX_WORDS}: rule says revise]")
                if verdict == "revise" and revisions >= max_revisions:
                    verdict = "reject"  # a bounded loop: never revise forever
                    path.append(f"[{revisions} revisions already: give up]")
                state = NEXT_STATE[verdict]
            case "revise":
                draft = await reviser(draft)
                calls += 1
                revisions += 1
                state = "review"
        path.append(state)
    return Decision(path, draft, llm_calls=calls, extra={"revisions": str(revisions)})


# ---------------------------------------------------------------------------------------------
# 6. Priority-based routing
# ---------------------------------------------------------------------------------------------

Priority = Literal["urgent", "high", "medium", "low"]
PRIORITY_RANK: dict[str, int] = {"urgent": 0, "high": 1, "medium": 2, "low": 3}
URGENT_WORDS = ("outage", "down", "security", "breach", "data loss")


@agent(max_tokens=16, temperature=0)
async def rate_priority(ticket: str) -> Literal["high", "medium", "low"]:
    """Rate the priority of this support ticket as high, medium or low.
    Ticket: {{ ticket }}"""


@agent(max_tokens=48)
async def incident_notice(ticket: str) -> str:
    """Write a one-sentence incident notice for the on-call team about: {{ ticket }}"""


@agent(max_tokens=48)
async def support_reply(ticket: str, tone: str) -> str:
    """Write a {{ tone }} one-sentence reply to this support ticket: {{ ticket }}"""


async def prioritise(ticket: str) -> tuple[Priority, str]:
    """Rules first (free, exact), the LLM only for what the rules cannot decide."""
    lowered = ticket.lower()
    if any(word in lowered for word in URGENT_WORDS):
        return "urgent", "rule"
    return await rate_priority(ticket), "llm"


@workflow
async def priority_router(tickets: list[str]) -> list[tuple[Priority, str, str, str]]:
    """Triage every ticket in parallel, then handle them most urgent first."""
    triaged = await asyncio.gather(*(prioritise(t) for t in tickets))
    queue = sorted(zip(tickets, triaged, strict=True), key=lambda item: PRIORITY_RANK[item[1][0]])
    handled: list[tuple[Priority, str, str, str]] = []
    for ticket, (priority, decided_by) in queue:
        if priority == "urgent":
            answer = "PAGE ON-CALL: " + await incident_notice(ticket)
        elif priority == "high":
            answer = await support_reply(ticket, "reassuring and specific")
        elif priority == "medium":
            answer = await support_reply(ticket, "friendly")
        else:
            answer = "Added to the backlog; we reply to these within 3 working days."
        handled.append((priority, decided_by, ticket, answer))
    return handled


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def describe_model() -> None:
    model = resolve_model(None)
    print(f"Agents that name no model run on: {model.id}")
    if model.provider == "local":
        print(
            "  (the embedded SmolLM2-135M: tiny and fast, not smart. Its labels are often the\n"
            "  same whatever the input, but they are always one of the Literal labels, so every\n"
            "  branch below is well-defined. Set OPENAI_API_KEY to route with gpt-4o-mini.)"
        )


def show(label: str, decision: Decision) -> None:
    print(f"- {short(label, 70)!r}")
    print(f"    path:   {' -> '.join(decision.path)}")
    print(f"    answer: {short(decision.answer)}")


async def main() -> None:
    started = time.perf_counter()
    describe_model()

    header("1. Sentiment-based branching")
    for text in (
        "I love this product, it works great!",
        "This is terrible, it broke after one day.",
        "The package arrived on Tuesday.",
    ):
        show(text, await respond_to_feedback(text))

    header("2. Content type classification")
    for text in (
        "How do I export my data to CSV?",
        "def add(a, b):\n    return a + b",
        "Your app crashed and I lost my work!",
        "Have a nice weekend, team.",
    ):
        show(text, await route_content(text))

    header("3. Multi-level conditional logic")
    cases: list[tuple[str, Plan]] = [
        ("The dashboard is down for all our users.", "enterprise"),
        ("I was charged twice this month, please refund me.", "free"),
        ("I forgot my password.", "pro"),
    ]
    for message, plan in cases:
        decision = await support_triage(message, plan)
        show(f"[{plan}] {message}", decision)
        print(f"    llm calls: {decision.llm_calls}")

    header("4. Context-aware routing (same message, three users)")
    message = "How do I add a teammate to my project?"
    for user in (
        UserContext("Ana", tier="free", language="English", recent_contacts=0),
        UserContext("Bruno", tier="pro", language="French", recent_contacts=1),
        UserContext("Chen", tier="pro", language="English", recent_contacts=4),
    ):
        show(
            f"{user.name} ({user.tier}, {user.language}): {message}",
            await context_router(message, user),
        )

    header("5. State machine workflow")
    decision = await publishing_state_machine("our new offline mode for the mobile app")
    print(f"    states: {' -> '.join(decision.path)}")
    print(f"    revisions: {decision.extra['revisions']}, llm calls: {decision.llm_calls}")
    print(f"    final draft ({len(decision.answer.split())} words): {short(decision.answer)}")

    header("6. Priority-based routing")
    tickets = [
        "Could you add a dark theme some day?",
        "Our production site is down since 9am!",
        "The export button gives an error for large files.",
        "Typo on the pricing page.",
        "Possible security breach: unknown logins on my account.",
    ]
    print("  handled in this order (priority, decided by, ticket -> answer):")
    for priority, decided_by, ticket, answer in await priority_router(tickets):
        print(f"  {priority:>6} ({decided_by:>4}) {short(ticket, 50)!r}")
        print(f"           -> {short(answer, 80)}")

    print(f"\nDone in {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    asyncio.run(main())
