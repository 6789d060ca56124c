"""``@tool``: schemas from type hints and docstrings, and the agent's tool-call loop."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import threading
import warnings
from typing import Annotated, Literal

import pydantic
import pytest

from kagura import Tool, ToolLoopError, UsageError, agent, get_current_span, tool
from kagura.providers import ModelRequest, ToolCall
from kagura.testing import FakeModel, Reply, capture_events


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number, which may be
            described over two lines.
            Note: it may be negative.

    Returns:
        The sum, which the model is not told about.
    """
    return a + b


@tool
async def lookup(city: str, unit: Literal["C", "F"] = "C", days: list[int] | None = None) -> dict:
    """Look up the weather.

    Args:
        city (str): City name, e.g. Paris: France.
        unit: Temperature unit.
    """
    return {"city": city, "unit": unit, "days": days}


def call(name: str, arguments: object, id: str = "call_1") -> ToolCall:
    return ToolCall(id, name, arguments if isinstance(arguments, str) else json.dumps(arguments))


def tool_calls(*calls: ToolCall) -> Reply:
    return Reply(tool_calls=calls)


# -- schema -------------------------------------------------------------------------------------


def test_schema_from_type_hints_and_docstring() -> None:
    assert isinstance(add, Tool)
    assert add.name == "add"
    assert add.spec.name == "add"
    assert add.spec.description == "Add two integers."
    params = add.spec.parameters
    assert params["type"] == "object"
    assert params["required"] == ["a", "b"]
    assert params["properties"]["a"]["type"] == "integer"
    assert params["properties"]["a"]["description"] == "The first number."
    assert (
        params["properties"]["b"]["description"]
        == "The second number, which may be described over two lines. Note: it may be negative."
    )


def test_schema_defaults_optional_and_literal_parameters() -> None:
    params = lookup.spec.parameters
    assert params["required"] == ["city"]
    assert params["properties"]["city"]["description"] == "City name, e.g. Paris: France."
    assert params["properties"]["unit"]["enum"] == ["C", "F"]
    assert params["properties"]["unit"]["default"] == "C"
    assert params["properties"]["unit"]["description"] == "Temperature unit."
    assert "description" not in params["properties"]["days"]
    assert lookup.spec.description == "Look up the weather."


def test_tool_without_docstring_is_described_by_its_name() -> None:
    @tool
    def ping() -> str:
        return "pong"

    assert ping.spec.description == "ping"
    assert ping.spec.parameters["properties"] == {}


def test_tool_name_can_be_set_and_is_validated() -> None:
    @tool(name="web-search")
    def search(q: str) -> str:
        """Search."""
        return q

    assert search.name == search.spec.name == "web-search"
    with pytest.raises(UsageError, match="tool name"):

        @tool(name="has spaces")
        def bad(q: str) -> str:
            return q


def test_var_args_cannot_be_described() -> None:
    with pytest.raises(UsageError, match=r"\*args"):

        @tool
        def anything(*args: str) -> str:
            return ""


async def test_calling_the_tool_object_calls_the_function() -> None:
    assert add(2, 3) == 5
    assert await lookup("Oslo") == {"city": "Oslo", "unit": "C", "days": None}


def test_two_tools_with_one_name_are_rejected() -> None:
    @tool(name="add")
    def other_add(x: int) -> int:
        return x

    with pytest.raises(UsageError, match="two tools"):

        @agent(model=FakeModel(), tools=[add, other_add])
        async def calc(q: str) -> str:
            """{{ q }}"""


# -- native tool calling ------------------------------------------------------------------------


async def test_native_tool_loop() -> None:
    fake = FakeModel([tool_calls(call("add", {"a": 2, "b": 3})), '{"result": 5}'])

    @agent(model=fake, tools=[add])
    async def calc(question: str) -> int:
        """{{ question }}"""

    assert await calc("2+3?") == 5
    first, second = fake.requests
    assert first.tools == [add.spec]
    assert second.tools == [add.spec]
    n = len(first.messages)
    assert second.messages[:n] == first.messages
    assistant, result = second.messages[n:]
    assert assistant["role"] == "assistant"
    assert assistant["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
        }
    ]
    assert result == {"role": "tool", "tool_call_id": "call_1", "content": "5"}


async def test_parallel_tool_calls_in_one_round() -> None:
    fake = FakeModel(
        [
            tool_calls(
                call("add", {"a": 1, "b": 1}, id="x"),
                call("lookup", {"city": "Oslo", "days": [1, 2]}, id="y"),
            ),
            "done",
        ]
    )

    @agent(model=fake, tools=[add, lookup])
    async def planner(q: str) -> str:
        """{{ q }}"""

    assert await planner("go") == "done"
    tool_messages = [m for m in fake.requests[1].messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["x", "y"]
    assert tool_messages[0]["content"] == "2"
    # Non-string results go back to the model as JSON.
    assert json.loads(tool_messages[1]["content"]) == {"city": "Oslo", "unit": "C", "days": [1, 2]}


async def test_several_rounds_then_answer() -> None:
    fake = FakeModel(
        [
            tool_calls(call("add", {"a": 1, "b": 2}, id="r1")),
            tool_calls(call("add", {"a": 3, "b": 4}, id="r2")),
            "10",
        ]
    )

    @agent(model=fake, tools=[add], max_tool_rounds=2)
    async def calc(q: str) -> int:
        """{{ q }}"""

    assert await calc("q") == 10
    assert len(fake.requests) == 3
    contents = [m["content"] for m in fake.requests[2].messages if m["role"] == "tool"]
    assert contents == ["3", "7"]


async def test_tool_rounds_are_bounded() -> None:
    fake = FakeModel([tool_calls(call("add", {"a": 1, "b": 1}, id=f"c{i}")) for i in range(10)])
    runs: list[tuple[int, int]] = []

    @tool(name="add")
    def counted(a: int, b: int) -> int:
        runs.append((a, b))
        return a + b

    @agent(model=fake, tools=[counted], max_tool_rounds=3)
    async def looping(q: str) -> int:
        """{{ q }}"""

    with pytest.raises(ToolLoopError, match="3 rounds"):
        await looping("q")
    assert len(fake.requests) == 4
    assert len(runs) == 3


async def test_failing_tool_reports_its_error_to_the_model() -> None:
    @tool
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        return a / b

    fake = FakeModel([tool_calls(call("divide", {"a": 1, "b": 0})), "cannot divide by zero"])

    @agent(model=fake, tools=[divide])
    async def calc(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        assert await calc("1/0") == "cannot divide by zero"
    message = fake.requests[1].messages[-1]
    assert message["role"] == "tool"
    assert message["content"] == "Error: ZeroDivisionError: float division by zero"
    (span,) = events.spans(kind="tool")
    assert span.status == "failed"
    assert span.error_type == "ZeroDivisionError"
    assert events.spans(kind="agent")[0].status == "completed"


class Unsayable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words for it")


async def test_a_tool_error_whose_str_fails_is_still_reported_to_the_model() -> None:
    @tool
    def broken(key: str) -> str:
        """Look ``key`` up."""
        raise Unsayable

    fake = FakeModel([tool_calls(call("broken", {"key": "k"})), "it failed"])

    @agent(model=fake, tools=[broken])
    async def ask(q: str) -> str:
        """{{ q }}"""

    assert await ask("x") == "it failed"
    message = fake.requests[1].messages[-1]
    assert message["content"] == (
        "Error: Unsayable: <str() of Unsayable failed: RuntimeError('no words for it')>"
    )


async def test_unknown_tool_name_is_reported_to_the_model() -> None:
    fake = FakeModel([tool_calls(call("multiply", {"a": 2, "b": 2})), "ok"])

    @agent(model=fake, tools=[add])
    async def calc(q: str) -> str:
        """{{ q }}"""

    assert await calc("q") == "ok"
    content = fake.requests[1].messages[-1]["content"]
    assert "no tool named 'multiply'" in content
    assert "add" in content


@pytest.mark.parametrize(
    "arguments",
    [
        {"a": "two", "b": 1},
        {"a": 1},
        "not json",
        "[1, 2]",
        # Past what json.loads can recurse through: a RecursionError ended the call.
        pytest.param("[" * 3000, id="unclosed-arrays-3000-deep"),
        pytest.param('{"a": ' + "[" * 3000 + "]" * 3000 + ', "b": 1}', id="arrays-3000-deep"),
    ],
    ids=str,
)
async def test_invalid_arguments_are_reported_to_the_model(arguments: object) -> None:
    fake = FakeModel([tool_calls(call("add", arguments)), "ok"])

    @agent(model=fake, tools=[add])
    async def calc(q: str) -> str:
        """{{ q }}"""

    assert await calc("q") == "ok"
    assert fake.requests[1].messages[-1]["content"].startswith("Error: ")


class Booking(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    day: datetime.date
    seats: tuple[int, int]


async def test_a_strict_parameter_takes_the_json_forms_its_schema_asks_for() -> None:
    # The arguments are JSON text, validated as JSON: strict in Python mode, the model refuses
    # the date's string and the tuple's array that its schema asks the model for.
    @tool
    def book(booking: Booking, on: Annotated[datetime.date, pydantic.Strict()]) -> str:
        """Book seats."""
        return f"{booking.day} {booking.seats} {on}"

    arguments = {"booking": {"day": "2024-05-01", "seats": [1, 2]}, "on": "2024-04-01"}
    fake = FakeModel([tool_calls(call("book", arguments)), "ok"])

    @agent(model=fake, tools=[book])
    async def assistant(q: str) -> str:
        """{{ q }}"""

    assert await assistant("q") == "ok"
    assert fake.requests[1].messages[-1]["content"] == "2024-05-01 (1, 2) 2024-04-01"
    assert await book.invoke(arguments) == "2024-05-01 (1, 2) 2024-04-01"


async def test_a_dict_of_python_values_is_validated_as_the_values_it_holds() -> None:
    # Written out as JSON first, a SecretStr arrived masked, and bytes that are not UTF-8 not
    # at all.
    @tool
    def sign(
        on: Annotated[datetime.date, pydantic.Strict()], key: pydantic.SecretStr, salt: bytes
    ) -> str:
        """Sign."""
        return f"{on} {key.get_secret_value()} {salt!r}"

    arguments = {"on": datetime.date(2024, 5, 1), "key": pydantic.SecretStr("pw"), "salt": b"\xff"}
    assert await sign.invoke(arguments) == "2024-05-01 pw b'\\xff'"


async def test_half_a_character_in_an_argument_is_taken_as_json_loads_reads_it() -> None:
    # A lone surrogate, as small models write when they cut an emoji in two: pydantic's JSON
    # reader refuses it, json.loads reads it, as the arguments were read before.
    seen: list[str] = []

    @tool
    def note(text: str) -> str:
        """Note text down."""
        seen.append(text)
        return "noted"

    fake = FakeModel([tool_calls(call("note", '{"text": "smile \\ud83d"}')), "ok"])

    @agent(model=fake, tools=[note])
    async def scribe(q: str) -> str:
        """{{ q }}"""

    assert await scribe("q") == "ok"
    assert seen == ["smile \ud83d"]


async def test_sync_tools_run_off_the_event_loop_and_async_tools_on_it() -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    @tool
    def sync_tool() -> str:
        seen["sync"] = threading.get_ident()
        return "s"

    @tool
    async def async_tool() -> str:
        seen["async"] = threading.get_ident()
        return "a"

    fake = FakeModel(
        [tool_calls(call("sync_tool", {}, id="1"), call("async_tool", "", id="2")), "ok"]
    )

    @agent(model=fake, tools=[sync_tool, async_tool])
    async def both(q: str) -> str:
        """{{ q }}"""

    assert await both("q") == "ok"
    assert [m["content"] for m in fake.requests[1].messages if m["role"] == "tool"] == ["s", "a"]
    assert seen["async"] == loop_thread
    assert seen["sync"] != loop_thread


async def test_plain_functions_are_accepted_as_tools() -> None:
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    fake = FakeModel([tool_calls(call("shout", {"text": "hi"})), "ok"])

    @agent(model=fake, tools=[shout])
    async def loud(q: str) -> str:
        """{{ q }}"""

    assert await loud("q") == "ok"
    assert fake.requests[0].tools[0].description == "Upper-case the text."
    assert fake.requests[1].messages[-1]["content"] == "HI"


async def test_tool_runs_inside_its_own_span_of_the_agent_run() -> None:
    seen = {}

    @tool
    async def where() -> str:
        span = get_current_span()
        assert span is not None
        seen["kind"], seen["run_id"] = span.kind, span.run_id
        return "here"

    fake = FakeModel([tool_calls(call("where", {})), "ok"])

    @agent(model=fake, tools=[where])
    async def locate(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        await locate("q")
    (agent_span,) = events.spans(kind="agent")
    (tool_span,) = events.spans(kind="tool")
    assert seen == {"kind": "tool", "run_id": agent_span.run_id}
    assert tool_span.parent_id == agent_span.span_id
    assert tool_span.attributes["output"] == "here"


async def test_cancelling_the_agent_cancels_a_running_tool() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @tool
    async def forever() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "unreachable"

    fake = FakeModel([tool_calls(call("forever", {}))])

    @agent(model=fake, tools=[forever])
    async def stuck(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        task = asyncio.create_task(stuck("q"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert cancelled.is_set()
    assert events.spans(kind="tool")[0].status == "cancelled"
    assert events.spans(kind="agent")[0].status == "cancelled"


async def test_a_tool_cancelled_by_someone_else_failed_and_the_call_goes_on() -> None:
    @tool
    async def orphaned() -> str:
        """Waits for what someone else gives up on."""
        awaited = asyncio.get_running_loop().create_future()
        awaited.cancel()
        return str(await awaited)

    fake = FakeModel(
        [
            tool_calls(call("orphaned", {}, id="a"), call("add", {"a": 1, "b": 2}, id="b")),
            "Three.",
        ]
    )

    @agent(model=fake, tools=[orphaned, add])
    async def sums(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        assert await sums("q") == "Three."
    replies = [m["content"] for m in fake.requests[1].messages if m["role"] == "tool"]
    assert replies == ["Error: CancelledError: ", "3"]
    assert sorted(s.status for s in events.spans(kind="tool")) == ["completed", "failed"]


class Halt(BaseException):
    """Not an error a tool reports to the model: it ends the call (as KeyboardInterrupt)."""


async def test_a_tool_that_ends_the_call_cancels_the_tools_beside_it() -> None:
    started = asyncio.Event()
    ended: list[str] = []

    @tool
    async def forever() -> str:
        """Never answers."""
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ended.append("forever cancelled")
            raise
        return "unreachable"

    @tool
    async def halt() -> str:
        """Ends everything."""
        await started.wait()
        raise Halt

    fake = FakeModel([tool_calls(call("forever", {}, id="a"), call("halt", {}, id="b"))])

    @agent(model=fake, tools=[forever, halt])
    async def stuck(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        with pytest.raises(Halt):
            await stuck("q")
        # Ended with the call, not after it.
        assert ended == ["forever cancelled"]
    assert {s.name: s.status for s in events.spans(kind="tool")} == {
        "forever": "cancelled",
        "halt": "failed",
    }
    assert events.spans(kind="agent")[0].status == "failed"


# -- prompted tools (models without native tool calling) ------------------------------------------


async def test_prompted_tools_mode() -> None:
    call_text = 'I will use a tool. {"tool": "add", "arguments": {"a": 2, "b": 5}}'
    fake = FakeModel([call_text, '{"answer": 7}'], supports_tools=False)

    @agent(model=fake, tools=[add])
    async def calc(question: str) -> int:
        """{{ question }}"""

    assert await calc("2+5?") == 7
    first, second = fake.requests
    assert first.tools == []  # no native tools offered
    prompt = first.messages[-1]["content"]
    assert prompt.startswith("2+5?")
    assert "- add(a: integer, b: integer): Add two integers." in prompt
    assert "a: The first number" in prompt
    # A worked example with the tool's real name and arguments, which small models follow.
    assert '{"tool": "add", "arguments": {"a": "...", "b": "..."}}' in prompt
    assert '{"answer": ...}' in prompt
    # The model must answer either a call of a tool with its arguments, or a typed answer.
    assert first.output_schema is not None
    options = first.output_schema.schema["anyOf"]
    assert options[0]["properties"]["tool"] == {"enum": ["add"]}
    assert options[0]["properties"]["arguments"] == add.spec.parameters
    assert options[1]["properties"]["answer"] == {"type": "integer"}
    assert second.messages[-2] == {"role": "assistant", "content": call_text}
    assert second.messages[-1] == {"role": "user", "content": "Result of add: 7\nNow continue."}


async def test_prompted_tools_text_answer_and_errors() -> None:
    def reply(request: ModelRequest) -> str:
        last = request.messages[-1]["content"]
        if last.startswith("Result of"):
            return json.dumps({"answer": last.splitlines()[0]})
        return '{"tool": "nope", "arguments": {}}'

    fake = FakeModel([reply, reply], supports_tools=False)

    @agent(model=fake, tools=[add])
    async def calc(q: str) -> str:
        """{{ q }}"""

    answer = await calc("q")
    assert answer.startswith("Result of nope: Error: there is no tool named 'nope'")


async def test_prompted_tools_structured_answer() -> None:
    fake = FakeModel(['{"answer": {"city": "Oslo", "temp": 3}}'], supports_tools=False)

    @agent(model=fake, tools=[add])
    async def weather(q: str) -> dict[str, str | int]:
        """{{ q }}"""

    assert await weather("q") == {"city": "Oslo", "temp": 3}


@pytest.mark.parametrize(
    "answer", ["[" * 3000, '{"tool": "add", "arguments": ' + "[" * 3000], ids=["bare", "arguments"]
)
async def test_a_prompted_answer_nested_too_deeply_is_asked_again(answer: str) -> None:
    fake = FakeModel([answer, '{"answer": 7}'], supports_tools=False)

    @agent(model=fake, tools=[add], output_retries=1)
    async def calc(q: str) -> int:
        """{{ q }}"""

    assert await calc("q") == 7
    assert fake.requests[1].messages[-1]["content"].startswith("That answer is not valid: ")


async def test_a_prompted_answer_of_nan_is_asked_again_not_taken_as_null() -> None:
    fake = FakeModel(['{"answer": NaN}', '{"answer": 2.5}'], supports_tools=False)

    @agent(model=fake, tools=[add], output_retries=1)
    async def measure(q: str) -> float | None:
        """{{ q }}"""

    assert await measure("q") == 2.5
    assert "Input should be a finite number" in fake.requests[1].messages[-1]["content"]


async def test_prompted_tools_are_bounded_too() -> None:
    fake = FakeModel(['{"tool": "add", "arguments": {"a": 1, "b": 1}}'] * 5, supports_tools=False)

    @agent(model=fake, tools=[add], max_tool_rounds=2)
    async def looping(q: str) -> int:
        """{{ q }}"""

    with pytest.raises(ToolLoopError):
        await looping("q")
    assert len(fake.requests) == 3


# -- what users give as tools, and what tools give back ------------------------------------------


async def test_a_result_with_no_json_goes_to_the_model_as_its_repr() -> None:
    ran: list[str] = []

    @tool
    def snapshot(name: str) -> object:
        """Take a snapshot."""
        ran.append(name)
        looped: dict[str, object] = {"name": name}
        looped["self"] = looped
        return b"\x89PNG" if name == "png" else looped

    fake = FakeModel(
        [
            tool_calls(call("snapshot", {"name": "png"}), call("snapshot", {"name": "loop"}, "c2")),
            "done",
        ]
    )

    @agent(model=fake, tools=[snapshot])
    async def shoot(q: str) -> str:
        """{{ q }}"""

    # The tool ran: failing the call now would lose what it did.
    assert await shoot("go") == "done"
    assert ran == ["png", "loop"]
    replies = [m["content"] for m in fake.requests[1].messages if m["role"] == "tool"]
    assert replies == [repr(b"\x89PNG"), "{'name': 'loop', 'self': {...}}"]


async def test_an_agent_given_as_a_tool_is_awaited() -> None:
    inner = FakeModel(["bonjour"])

    @agent(model=inner)
    async def translate(text: str) -> str:
        """Translate to French: {{ text }}"""

    outer = FakeModel([tool_calls(call("translate", {"text": "hello"})), "it is bonjour"])

    @agent(model=outer, tools=[translate])
    async def assistant(q: str) -> str:
        """{{ q }}"""

    assert await assistant("hello in French?") == "it is bonjour"
    assert outer.requests[1].messages[-1]["content"] == "bonjour"
    assert translate.name in {spec.name for spec in outer.requests[0].tools}


async def test_positional_only_parameters_are_passed_by_position() -> None:
    def power(base: int, exponent: int = 2, /) -> int:
        """Raise base to exponent."""
        return int(base**exponent)

    fake = FakeModel([tool_calls(call("power", {"base": 3})), "nine"])

    @agent(model=fake, tools=[power])
    async def calc(q: str) -> str:
        """{{ q }}"""

    assert await calc("3 squared") == "nine"
    assert fake.requests[1].messages[-1]["content"] == "9"


def test_a_partial_or_a_callable_object_with_a_name_is_a_tool() -> None:
    import functools

    class Scale:
        def __call__(self, value: float) -> float:
            """Scale a value."""
            return value * 2

    def plus(a: int, b: int) -> int:
        """Add."""
        return a + b

    by_partial = Tool(functools.partial(plus, b=1), name="increment")
    assert by_partial.spec.parameters["required"] == ["a"]
    assert Tool(Scale(), name="scale").spec.parameters["properties"]["value"]["type"] == "number"


async def test_a_partials_bound_keywords_are_neither_shown_to_nor_set_by_the_model() -> None:
    import functools

    seen: list[tuple[str, str]] = []

    def get_orders(customer: str, user_id: str, api_token: str) -> str:
        """The orders of a customer, as user_id may see them."""
        seen.append((customer, user_id))
        return f"orders of {customer}"

    orders = tool(
        functools.partial(get_orders, user_id="alice", api_token="sk-live-SECRET"), name="orders"
    )
    assert orders.description == "The orders of a customer, as user_id may see them."
    assert orders.spec.parameters["properties"].keys() == {"customer"}
    assert "SECRET" not in json.dumps(orders.spec.parameters)
    fake = FakeModel(
        [
            tool_calls(call("orders", {"customer": "bob", "user_id": "admin"})),
            tool_calls(call("orders", {"customer": "bob"}, id="call_2")),
            "done",
        ]
    )

    @agent(model=fake, tools=[orders])
    async def support(q: str) -> str:
        """{{ q }}"""

    assert await support("show bob's orders") == "done"
    refused = fake.requests[1].messages[-1]["content"]
    assert "unknown argument(s) user_id" in refused and "takes customer" in refused
    assert seen == [("bob", "alice")]  # only the second call ran, as alice


async def test_a_bound_keyword_is_refused_with_half_a_character_in_the_arguments_too() -> None:
    import functools

    def get_orders(customer: str, user_id: str) -> str:
        """The orders of a customer, as user_id may see them."""
        return f"orders of {customer} as {user_id}"

    orders = tool(functools.partial(get_orders, user_id="alice"), name="orders")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) user_id"):
        await orders.invoke('{"customer": "bob \\ud83d", "user_id": "admin"}')
    assert await orders.invoke('{"customer": "bob \\ud83d"}') == "orders of bob \ud83d as alice"


def test_a_bound_method_or_a_callable_object_is_described_by_its_own_docstring() -> None:
    class Prices:
        def convert(self, amount: float) -> float:
            """Convert an amount.

            Args:
                amount: In euros.
            """
            return amount

    class Scale:
        def __call__(self, value: float) -> float:
            """Scale a value."""
            return value * 2

    method = Tool(Prices().convert)
    assert method.name == "convert" and method.description == "Convert an amount."
    assert method.spec.parameters["properties"]["amount"]["description"] == "In euros."
    assert Tool(Scale(), name="scale").description == "Scale a value."


def test_a_dataclass_without_a_docstring_is_described_by_its_call_s() -> None:
    # dataclasses gives such a class its signature as a docstring: no description of the tool.
    @dataclasses.dataclass
    class Search:
        index: str

        def __call__(self, query: str) -> str:
            """Search the index for a query.

            Args:
                query: Words to look for.
            """
            return query

    @dataclasses.dataclass
    class Documented:
        """Search the documents."""

        index: str

        def __call__(self, query: str) -> str:
            return query

    search = Tool(Search("docs"), name="search")
    assert search.description == "Search the index for a query."
    assert search.spec.parameters["properties"]["query"]["description"] == "Words to look for."
    assert Tool(Documented("docs"), name="search").description == "Search the documents."


class Point:  # a plain class: pydantic cannot describe it
    x = 0


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda: Tool("scale"), "a tool is a function"),
        (lambda: Tool(_takes_point), "cannot be described"),
        (
            lambda: Tool(_unresolved),
            "annotations cannot be resolved.*Vector.*module level before the tool",
        ),
        (lambda: Tool(_not_a_type), "an annotation is not a type.*SyntaxError"),
        (lambda: Tool(_Nameless()), "no __name__"),
    ],
)
def test_a_tool_that_cannot_be_described_is_refused_at_definition(make: object, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        make()  # type: ignore[operator]


async def test_a_parameter_may_have_a_name_pydantic_keeps_for_itself() -> None:
    # The arguments are checked by a pydantic model, whose own names (json, schema, copy,
    # model_config, private _names) are its fields' aliases here: no warning, nothing refused.
    def query(
        json: str, schema: str, copy: int, model_config: str = "-", _cache: bool = False
    ) -> str:
        """Run a query."""
        return f"{json} {schema} {copy} {model_config} {_cache}"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        described = Tool(query)
    parameters = described.spec.parameters
    assert list(parameters["properties"]) == ["json", "schema", "copy", "model_config", "_cache"]
    assert parameters["required"] == ["json", "schema", "copy"]
    given = {"json": "{}", "schema": "s", "copy": 2, "model_config": "c", "_cache": True}
    assert await described.invoke(given) == "{} s 2 c True"


class _Nameless:
    def __call__(self) -> int:
        return 0


def _takes_point(p: Point) -> int:
    return 0


def _not_a_type(v: "list[int") -> int:  # type: ignore[syntax]  # noqa: F722
    return 0


def _unresolved(v: Vector) -> int:  # type: ignore[name-defined]  # noqa: F821
    return 0


def test_tools_given_as_other_than_a_list_of_functions_are_refused() -> None:
    async def ask(q: str) -> str:
        """{{ q }}"""

    for tools in (len, "add", ["add"]):
        with pytest.raises(UsageError):
            agent(model=FakeModel(), tools=tools)(ask)  # type: ignore[call-overload]
