"""Typed results: the return annotation decides the schema asked for and the value returned."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import uuid
from typing import Annotated, Any, Literal

import pydantic
import pytest
from typing_extensions import TypedDict

from kagura import Agent, OutputParseError, UsageError, agent
from kagura.testing import FakeModel


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class Person(pydantic.BaseModel):
    name: str
    age: int


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Movie(TypedDict):
    title: str
    year: int


class Team(pydantic.BaseModel):
    name: str
    members: list[Person]


def make_agent(return_type: Any, fake: FakeModel, **options: Any) -> Agent[..., Any]:
    """An agent that returns ``return_type``, as ``async def answer(...) -> return_type`` would."""

    async def answer(question: str):  # type: ignore[no-untyped-def]
        """Answer: {{ question }}"""

    answer.__annotations__["return"] = return_type
    return agent(model=fake, **options)(answer)


async def ask(return_type: Any, reply: str) -> Any:
    fake = FakeModel([reply])
    return await make_agent(return_type, fake, output_retries=0)("q")


CLEAN_JSON = [
    (int, "42", 42),
    (float, "2.5", 2.5),
    (bool, "true", True),
    (bool, "false", False),
    (Literal["positive", "negative"], '"negative"', "negative"),
    (Mood, '"sad"', Mood.SAD),
    (list[int], "[1, 2, 3]", [1, 2, 3]),
    (list[str], '["a", "b"]', ["a", "b"]),
    (dict[str, int], '{"a": 1, "b": 2}', {"a": 1, "b": 2}),
    (tuple[int, str], '[1, "one"]', (1, "one")),
    (int | None, "7", 7),
    (int | None, "null", None),
    (Person, '{"name": "Ada", "age": 36}', Person(name="Ada", age=36)),
    (Point, '{"x": 1, "y": 2}', Point(1, 2)),
    (Movie, '{"title": "Up", "year": 2009}', {"title": "Up", "year": 2009}),
    (
        Team,
        '{"name": "core", "members": [{"name": "Ada", "age": 36}]}',
        Team(name="core", members=[Person(name="Ada", age=36)]),
    ),
]


def _id(case: tuple[Any, str, Any]) -> str:
    return f"{getattr(case[0], '__name__', case[0])}-{case[1]}"


@pytest.mark.parametrize(("tp", "text", "expected"), CLEAN_JSON, ids=[_id(c) for c in CLEAN_JSON])
async def test_clean_json(tp: Any, text: str, expected: Any) -> None:
    result = await ask(tp, text)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(("tp", "text", "expected"), CLEAN_JSON, ids=[_id(c) for c in CLEAN_JSON])
async def test_wrapped_in_result(tp: Any, text: str, expected: Any) -> None:
    assert await ask(tp, f'{{"result": {text}}}') == expected


@pytest.mark.parametrize(("tp", "text", "expected"), CLEAN_JSON, ids=[_id(c) for c in CLEAN_JSON])
async def test_fenced_json_block(tp: Any, text: str, expected: Any) -> None:
    assert await ask(tp, f"```json\n{text}\n```") == expected
    assert await ask(tp, f"Here it is:\n```\n{text}\n```\nAnything else?") == expected


@pytest.mark.parametrize(
    ("tp", "text", "expected"),
    [
        (Person, 'Sure! {"name": "Ada", "age": 36} Hope that helps.', Person(name="Ada", age=36)),
        (Point, 'The point is {"x": 3, "y": 4}.', Point(3, 4)),
        (list[int], "The numbers are [4, 5, 6], as requested.", [4, 5, 6]),
        (dict[str, int], 'Counts: {"a": 1} (approximately)', {"a": 1}),
        (int, 'I think {"result": 12} is right.', 12),
        (
            Movie,
            'Result: {"title": "a {tricky} title", "year": 1}',
            {"title": "a {tricky} title", "year": 1},
        ),
    ],
)
async def test_json_embedded_in_chatter(tp: Any, text: str, expected: Any) -> None:
    assert await ask(tp, text) == expected


@pytest.mark.parametrize(
    ("tp", "text", "expected"),
    [
        (int, "42", 42),
        (int, " 42\n", 42),
        (int, "The answer is 42.", 42),
        (float, "3.14", 3.14),
        (float, "About 2.5 units.", 2.5),
        (bool, "true", True),
        (bool, "False.", False),
        (Literal["Positive", "Negative"], "Positive.", "Positive"),
        (Literal["positive", "negative"], "Positive.", "positive"),
        (Literal["positive", "negative"], "The sentiment is NEGATIVE!", "negative"),
        (Mood, "happy", Mood.HAPPY),
        (Mood | None, "Sad.", Mood.SAD),
    ],
)
async def test_plain_scalars(tp: Any, text: str, expected: Any) -> None:
    assert await ask(tp, text) == expected


async def test_str_result_is_the_stripped_text() -> None:
    assert await ask(str, "  Hello there.  \n") == "Hello there."
    assert await ask(str, '{"result": "raw"}') == '{"result": "raw"}'


async def test_ambiguous_literal_is_not_guessed() -> None:
    with pytest.raises(OutputParseError):
        await ask(Literal["positive", "negative"], "could be positive or negative")


async def test_str_request_has_no_output_schema_or_instructions() -> None:
    fake = FakeModel(["plain"])
    await make_agent(str, fake)("q")
    request = fake.requests[0]
    assert request.output_schema is None
    assert request.messages == [{"role": "user", "content": "Answer: q"}]


async def test_unannotated_agent_returns_text() -> None:
    fake = FakeModel(["  text  "])

    @agent(model=fake)
    async def untyped(q):  # type: ignore[no-untyped-def]
        """{{ q }}"""

    assert await untyped("q") == "text"
    assert fake.requests[0].output_schema is None


@pytest.mark.parametrize(
    ("tp", "result_schema"),
    [
        (int, {"type": "integer"}),
        (bool, {"type": "boolean"}),
        (list[str], {"type": "array", "items": {"type": "string"}}),
    ],
)
async def test_scalar_types_ask_for_a_wrapped_schema(tp: Any, result_schema: Any) -> None:
    fake = FakeModel()
    await make_agent(tp, fake)("q")
    schema = fake.requests[0].output_schema
    assert schema is not None
    assert schema.schema["type"] == "object"
    assert schema.schema["required"] == ["result"]
    assert schema.schema["properties"]["result"] == result_schema
    prompt = fake.requests[0].messages[-1]["content"]
    assert prompt.startswith("Answer: q\n\n")
    assert json.dumps(schema.schema, separators=(",", ":")) in prompt


async def test_literal_and_enum_schemas_list_the_choices() -> None:
    for tp, values in [(Literal["a", "b"], ["a", "b"]), (Mood, ["happy", "sad"])]:
        fake = FakeModel()
        await make_agent(tp, fake)("q")
        schema = fake.requests[0].output_schema
        assert schema is not None
        assert values[0] in json.dumps(schema.schema)
        assert values[1] in json.dumps(schema.schema)


@pytest.mark.parametrize("tp", [Person, Point, Movie])
async def test_object_types_ask_for_their_own_schema(tp: Any) -> None:
    fake = FakeModel()
    await make_agent(tp, fake)("q")
    schema = fake.requests[0].output_schema
    assert schema is not None
    assert schema.name == tp.__name__
    assert schema.schema["type"] == "object"
    assert set(schema.schema["properties"]) == set(tp.__annotations__)
    assert "result" not in schema.schema["properties"]


async def test_nested_model_schema_keeps_its_definitions() -> None:
    fake = FakeModel()
    await make_agent(list[Person], fake)("q")
    schema = fake.requests[0].output_schema
    assert schema is not None
    assert "Person" in schema.schema["$defs"]
    assert schema.schema["properties"]["result"]["items"] == {"$ref": "#/$defs/Person"}


@pytest.mark.parametrize(
    "tp", [int, float, bool, Mood, list[int], dict[str, int], tuple[int, str], Person, Team, Movie]
)
async def test_fake_default_answer_satisfies_the_schema(tp: Any) -> None:
    """With nothing scripted the fake answers the smallest value fitting the schema."""
    result = await make_agent(tp, FakeModel(), output_retries=0)("q")
    pydantic.TypeAdapter(tp).validate_python(result)


def test_unsupported_return_type_is_a_usage_error_at_decoration() -> None:
    class Opaque:
        pass

    with pytest.raises(UsageError, match="cannot be used as an agent result"):
        make_agent(Opaque, FakeModel())


def nested_models(depth: int) -> Any:
    model: Any = pydantic.create_model("Level0", value=(int, ...))
    for level in range(1, depth):
        model = pydantic.create_model(f"Level{level}", inner=(model, ...))
    return model


class Span(enum.Enum):
    SHORT = (0, 10)
    LONG = (10, 100)


class Timed(pydantic.BaseModel):
    label: str
    span: Span


@pytest.mark.parametrize(
    ("tp", "says"),
    [
        # A valid Python pattern that pydantic's regex engine refuses.
        (Annotated[str, pydantic.Field(pattern=r"^[A-Z]{3}(?=-)")], "look-around"),
        (nested_models(200), "nest deeper than pydantic can make a JSON schema of"),
        # Choices whose JSON (what the schema offers the model) reads back as another value.
        (Span, "its choice <Span.SHORT: (0, 10)> as the JSON [0,10], which does not read back"),
        (list[Timed], "its choice <Span.SHORT: (0, 10)> as the JSON [0,10]"),
        (Literal["a", b"b"], "its choice b'b' as the JSON \"b\", which does not read back"),
        # The schema lists the values, and an object() has no JSON form.
        (enum.Enum("Sentinel", {"A": object()}), "Unable to serialize"),
    ],
)
def test_a_return_type_pydantic_refuses_is_a_usage_error_at_decoration(tp: Any, says: str) -> None:
    with pytest.raises(UsageError, match="cannot be used as an agent result") as raised:
        make_agent(tp, FakeModel())
    assert says in str(raised.value)


class Column(pydantic.BaseModel):
    name: str
    # An example that looks like a node of pydantic's core schema: it is a value, not a node.
    spec: dict[str, Any] = pydantic.Field(examples=[{"type": "enum", "values": ["a", "b"]}])


class DefaultLikeANode(pydantic.BaseModel):
    spec: dict[str, Any] = {"type": "enum", "name": "x"}
    extra: dict[str, Any] = pydantic.Field(
        default_factory=dict, json_schema_extra={"examples": [{"type": "literal"}]}
    )
    level: int = pydantic.Field(0, examples=[{"type": "enum"}])


@pytest.mark.parametrize("tp", [list[Column], DefaultLikeANode], ids=["examples", "defaults"])
async def test_a_default_or_example_that_looks_like_a_schema_node_is_no_choice(tp: Any) -> None:
    # Literals and Enums are looked for among the schema's nodes, not in values the user gave.
    answer = '[{"name": "a", "spec": {}}]' if tp == list[Column] else "{}"
    assert await ask(tp, answer) == pydantic.TypeAdapter(tp).validate_json(answer)


# -- strict types: validated as the JSON the schema describes ---------------------------------


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Event(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    title: str
    when: datetime.datetime
    day: datetime.date
    id: uuid.UUID
    colour: Colour
    span: tuple[int, int]


EVENT = '{"title": "launch", "when": "2024-05-01T10:00:00Z", "day": "2024-05-01", ' + (
    '"id": "00000000-0000-4000-8000-000000000000", "colour": "red", "span": [1, 2]}'
)


@pytest.mark.parametrize(
    "text",
    [EVENT, f'{{"result": {EVENT}}}', f"Here you are:\n```json\n{EVENT}\n```", f"Sure! {EVENT}"],
)
async def test_a_strict_model_takes_the_json_forms_its_schema_asks_for(text: str) -> None:
    # Strict in Python mode, a model refuses a date's string and a tuple's list: the answer is
    # JSON, and validated as JSON, as pydantic's own validate_json would.
    assert await ask(Event, text) == pydantic.TypeAdapter(Event).validate_json(EVENT)


@pytest.mark.parametrize(
    ("tp", "text", "expected"),
    [
        (Annotated[datetime.date, pydantic.Strict()], '"2024-05-01"', datetime.date(2024, 5, 1)),
        (Annotated[datetime.date, pydantic.Strict()], "2024-05-01", datetime.date(2024, 5, 1)),
        (Annotated[tuple[int, str], pydantic.Strict()], '[1, "one"]', (1, "one")),
        (Annotated[Colour, pydantic.Strict()], '{"result": "blue"}', Colour.BLUE),
        (Annotated[Colour, pydantic.Strict()], "blue.", Colour.BLUE),
    ],
)
async def test_a_strict_result_takes_the_json_forms_its_schema_asks_for(
    tp: Any, text: str, expected: Any
) -> None:
    assert await ask(tp, text) == expected


# -- answers that are no value of the type --------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "text"),
    [
        (Person, "[" * 3000),
        (Person, '{"name": ' + "[" * 3000),
        (Person, '```json\n{"name": "Ada", "age": ' + "[" * 3000 + "\n```"),
        (list[Any], "[" * 3000 + "]" * 3000),
    ],
    ids=["unclosed", "inside-an-object", "fenced", "closed"],
)
async def test_an_answer_nested_too_deeply_is_asked_again(tp: Any, text: str) -> None:
    # json.loads recurses as deep as the arrays nest: its RecursionError is an invalid answer.
    good = "[1]" if tp is not Person else '{"name": "Ada", "age": 36}'
    fake = FakeModel([text, good])
    assert await make_agent(tp, fake, output_retries=1)("q") == (
        [1] if tp is not Person else Person(name="Ada", age=36)
    )
    reask = fake.requests[1].messages[-1]["content"]
    assert reask.startswith("That answer is not valid: ")


class Reading(pydantic.BaseModel):
    sensor: str
    value: float


@pytest.mark.parametrize(
    ("tp", "text", "where"),
    [
        (Reading, '{"sensor": "t1", "value": NaN}', "value: "),
        (Reading, '{"sensor": "t1", "value": "NaN"}', "value: "),  # pydantic reads it as nan
        (Reading, '{"sensor": "t1", "value": -Infinity}', "value: "),
        (float, "NaN", "value: "),
        (float, '{"result": Infinity}', "value: "),
        (list[float], "[1.5, NaN]", "1: "),
        (float | None, "nan", "value: "),
        (float, "About 1e999 units.", "value: "),
    ],
)
async def test_nan_or_infinity_is_no_number_and_is_asked_again(
    tp: Any, text: str, where: str
) -> None:
    # JSON has no NaN: taken, it would flow into the caller's arithmetic, and a durable run
    # could not journal it (see tests/durable). Asked again, as for any other invalid answer.
    good = (
        '{"sensor": "t1", "value": 2.5}'
        if tp is Reading
        else "[2.5]"
        if tp == list[float]
        else "2.5"
    )
    fake = FakeModel([text, good])
    result = await make_agent(tp, fake, output_retries=1)("q")
    assert result == (
        Reading(sensor="t1", value=2.5) if tp is Reading else [2.5] if tp == list[float] else 2.5
    )
    reask = fake.requests[1].messages[-1]["content"]
    assert f"That answer is not valid: {where}Input should be a finite number" in reask


class Scores(pydantic.BaseModel):
    values: list[int]

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def average(self) -> float:
        return sum(self.values) / len(self.values)  # ZeroDivisionError when there are none


class Stats(pydantic.BaseModel):
    xs: list[float]
    spread: float = float("nan")  # a default, not the answer's

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def mean(self) -> float:
        return sum(self.xs) / len(self.xs) if self.xs else float("nan")

    @pydantic.field_serializer("xs")
    def _infinite_when_empty(self, xs: list[float]) -> list[float] | float:
        return xs or float("inf")


@pytest.mark.parametrize(
    ("tp", "text"), [(Scores, '{"values": []}'), (Stats, '{"xs": []}')], ids=["raises", "nan"]
)
async def test_a_computed_field_serializer_or_default_is_not_the_answer(tp: Any, text: str) -> None:
    # Whether the answer holds a NaN is decided by what it holds, not by the JSON form of the
    # model it makes: that would run the model's computed fields and serializers, which may
    # raise, or give a NaN no answer could change.
    assert (await ask(tp, text)).model_fields_set == {"values" if tp is Scores else "xs"}


class Unbounded(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(allow_inf_nan=True)
    x: float


class Gauge(pydantic.BaseModel):
    reading: float = pydantic.Field(allow_inf_nan=True)


@pytest.mark.parametrize(
    ("tp", "text"),
    [
        (Unbounded, '{"x": Infinity}'),
        (Gauge, '{"reading": NaN}'),
        (Annotated[float, pydantic.AllowInfNan(True)], "-Infinity"),
    ],
    ids=["config", "field", "annotated"],
)
async def test_a_type_that_allows_nan_and_infinity_takes_them(tp: Any, text: str) -> None:
    # allow_inf_nan=True says that they are values of the type: the user's to have.
    value = await ask(tp, text)
    number = value if isinstance(value, float) else next(iter(dict(value).values()))
    assert not math.isfinite(number)


class Report(pydantic.BaseModel):
    score: float
    raw: Unbounded
    reading: float = pydantic.Field(default=0.0, allow_inf_nan=True)
    strict: float = pydantic.Field(default=0.0, allow_inf_nan=False)


class LooseReport(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(allow_inf_nan=True)
    loose: float
    strict: float = pydantic.Field(default=0.0, allow_inf_nan=False)


@pytest.mark.parametrize(
    ("tp", "text", "refused"),
    [
        (Report, '{"score": NaN, "raw": {"x": 1}}', "score"),
        (Report, '{"score": 1, "raw": {"x": NaN}, "reading": NaN}', None),
        (LooseReport, '{"loose": NaN, "strict": NaN}', "strict"),
        (LooseReport, '{"loose": NaN}', None),
    ],
)
async def test_nan_is_taken_only_where_the_type_allows_it(
    tp: Any, text: str, refused: str | None
) -> None:
    # One field or nested model that allows NaN says nothing of the type's other floats.
    if refused is None:
        await ask(tp, text)
    else:
        with pytest.raises(OutputParseError, match=f"{refused}: Input should be a finite"):
            await ask(tp, text)


class Note(pydantic.BaseModel):
    text: str


async def test_half_a_character_in_a_string_is_taken_as_json_loads_reads_it() -> None:
    # A lone surrogate, as small models write when they cut an emoji in two: pydantic's JSON
    # reader refuses it, json.loads reads it (as every answer was read before).
    assert await ask(Note, '{"text": "smile \\ud83d"}') == Note(text="smile \ud83d")
    assert await ask(list[str], '{"result": ["\\ud83d", "a"]}') == ["\ud83d", "a"]


# -- re-asking ----------------------------------------------------------------------------------


async def test_invalid_answer_is_reasked_with_the_validation_error() -> None:
    fake = FakeModel(['{"name": "Ada"}', '{"name": "Ada", "age": 36}'])

    @agent(model=fake)
    async def who(q: str) -> Person:
        """{{ q }}"""

    assert await who("q") == Person(name="Ada", age=36)
    assert len(fake.requests) == 2
    first, retry = fake.requests
    assert retry.messages[: len(first.messages)] == first.messages
    assistant, reask = retry.messages[len(first.messages) :]
    assert assistant == {"role": "assistant", "content": '{"name": "Ada"}'}
    assert reask["role"] == "user"
    assert reask["content"].startswith("That answer is not valid: ")
    assert "age: Field required" in reask["content"]
    assert "Answer again." in reask["content"]
    # The schema is repeated so the model knows what shape to answer in.
    assert json.dumps(Person.model_json_schema(), separators=(",", ":")) in reask["content"]
    assert retry.output_schema == first.output_schema


async def test_reasks_accumulate_in_the_conversation() -> None:
    fake = FakeModel(["one", "two", "3"])
    result = await make_agent(int, fake, output_retries=2)("q")
    assert result == 3
    roles = [m["role"] for m in fake.requests[2].messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert fake.requests[2].messages[3]["content"] == "two"


async def test_reasks_are_bounded_by_output_retries() -> None:
    fake = FakeModel(["nope", "still nope", "never", "42"])
    with pytest.raises(OutputParseError) as info:
        await make_agent(int, fake, output_retries=1)("q")
    assert len(fake.requests) == 2
    error = info.value
    assert error.raw_text == "still nope"
    assert error.attempts == 2
    assert error.validation_error
    assert error.validation_error in str(error)
    assert "answer" in str(error)


async def test_zero_output_retries_fails_on_the_first_bad_answer() -> None:
    fake = FakeModel(['{"name": "Ada", "age": "old"}'])

    @agent(model=fake, output_retries=0)
    async def who(q: str) -> Person:
        """{{ q }}"""

    with pytest.raises(OutputParseError) as info:
        await who("q")
    assert len(fake.requests) == 1
    assert info.value.raw_text == '{"name": "Ada", "age": "old"}'
    assert "age" in info.value.validation_error
    assert info.value.agent == "who"


async def test_answer_without_json_is_reported_as_such() -> None:
    with pytest.raises(OutputParseError) as info:
        await ask(Person, "I don't know")
    assert info.value.validation_error
    assert info.value.raw_text == "I don't know"


@pytest.mark.parametrize(
    ("tp", "text"),
    [
        (Literal["yes", "no"], "I don't know."),  # "no" inside "know"
        (Literal["yes", "no"], "Unknown"),
        (Literal["positive", "negative", "neutral"], "It is not positive at all"),
        (Literal["positive", "negative", "neutral"], "Non-negative, I'd say"),
        (Literal["positive", "negative", "neutral"], "It isn't negative."),
        (Mood, "I am not happy"),
    ],
)
async def test_a_choice_only_inside_a_word_or_after_a_negation_is_not_taken(
    tp: Any, text: str
) -> None:
    # Taken, each would be a wrong value returned without an error: the model is asked again,
    # and then the call fails.
    with pytest.raises(OutputParseError):
        await ask(tp, text)


@pytest.mark.parametrize(
    ("tp", "text", "expected"),
    [
        (Literal["yes", "no"], "No.", "no"),
        (Literal["yes", "no"], "Yes, approve it.", "yes"),
        (Literal["not sure", "sure"], "I am not sure.", "not sure"),
        (Literal["positive", "negative"], "The answer: negative", "negative"),
    ],
)
async def test_a_choice_named_as_whole_words_in_prose_is_taken(
    tp: Any, text: str, expected: str
) -> None:
    assert await ask(tp, text) == expected


class Settings(pydantic.BaseModel):
    language: str = "en"
    max_items: int = 10


class Answer(pydantic.BaseModel):
    result: str = ""
    note: str = ""


async def test_an_object_the_model_wrapped_in_result_is_read_from_inside_the_wrapper() -> None:
    # The wrapper itself validates as the defaults (its key ignored): what it wraps comes first.
    wrapped = '{"result": {"language": "fr", "max_items": 3}}'
    assert await ask(Settings, wrapped) == Settings(language="fr", max_items=3)
    # A type with a field named "result" reads the object as it is.
    assert await ask(Answer, '{"result": "yes"}') == Answer(result="yes")


async def test_an_agent_annotated_none_is_refused_at_decoration() -> None:
    with pytest.raises(UsageError, match=r"annotated -> None.*-> str"):
        make_agent(None, FakeModel())
