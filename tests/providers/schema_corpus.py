"""Return types as users write them, for the grammar tests of test_schema_corpus.py.

Also run as a script (``python -m tests.providers.schema_corpus``) by the embedded-model test: it
calls an agent returning each type on the embedded model, in this one process (which a crash
would kill), and prints a JSON line per case.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
import sys
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    NaiveDatetime,
    StringConstraints,
    confloat,
    conint,
    constr,
)
from typing_extensions import TypedDict

T = TypeVar("T")


class IsoDay(BaseModel):
    day: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")


class Account(BaseModel):
    username: str = Field(pattern=r"^\w{3,16}$")
    token: str = Field(pattern=r"^\S+$")
    label: str = Field(pattern=r"^[^\s\d]+$")  # negations inside brackets
    initials: str = Field(pattern=r"^[\D]{2}$")


class Release(BaseModel):
    version: str = Field(pattern=r"^v\d+\.\d+\.\d+$")  # escaped dots
    host: str = Field(pattern=r"^[a-z0-9.-]+\.(com|org)$")


class Pet(BaseModel):
    kind: str = Field(pattern=r"^(cat|dog|bird)$")
    tag: str = Field(pattern=r"^[A-Z]{2,3}-\d{1,4}$")
    phone: str = Field(pattern=r"^\+?[\d ()-]{7,15}$")


class Loose(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")  # Rust's regex has no lookarounds

    code: str = Field(pattern=r"\d+")  # not anchored: "contains digits"
    word: str = Field(pattern=r"^\bfoo\b$")
    secret: str = Field(pattern=r"^(?=.*\d)(?=.*[a-z]).{8,}$")  # lookaheads


class Appointment(BaseModel):
    day: dt.date
    starts: dt.datetime
    at: dt.time
    email: Annotated[str, Field(json_schema_extra={"format": "email"})]
    site: HttpUrl  # a uri with maxLength 2083
    id: UUID


class LocalMeeting(BaseModel):
    starts: NaiveDatetime  # the converter's date-time rule would demand a time zone


class Profile(BaseModel):
    name: str
    nickname: str | None = None
    age: int | None


class Address(BaseModel):
    city: str
    zip: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str
    address: Address


class Node(BaseModel):
    label: str
    children: list[Node] = []


class Tree_Node(BaseModel):  # an underscore in a recursive model's name
    label: str
    children: list[Tree_Node] = []


class Tree(BaseModel, Generic[T]):
    value: T
    children: list[Tree[T]] = []


class Forest(BaseModel):
    trees: list[Node]


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Bounds(BaseModel):
    short: constr(min_length=2, max_length=8)
    word: Annotated[str, StringConstraints(max_length=5, to_lower=True)]
    score: conint(ge=1, le=10)
    ratio: confloat(ge=0, le=1)
    tags: list[str] = Field(min_length=1, max_length=3)


class Huge(BaseModel):
    essay: str = Field(max_length=100_000)
    items: list[int] = Field(max_length=5_000)
    digits: str = Field(pattern=r"^[0-9a-f]{1,2000}$")


class Quoted(BaseModel):
    said: Literal['say "hi"', "plain"]
    path: Literal["C:\\temp", "/tmp"]


class Aliased(BaseModel):
    value: int = Field(alias='the "value"')


class Movie(TypedDict):
    title: str
    year: int


class Point(NamedTuple):
    x: int
    y: int


#: (case name, return type). The names label the per-case results.
CORPUS: list[tuple[str, Any]] = [
    ("pattern \\d anchors", IsoDay),
    ("pattern \\w \\s negations", Account),
    ("pattern escaped dots", Release),
    ("pattern alternation quantifiers", Pet),
    ("pattern unanchored lookahead \\b", Loose),
    ("formats", Appointment),
    ("naive date-time", LocalMeeting),
    ("union of scalars", int | str),
    ("union of models", Pet | Release),
    ("optional fields", Profile),
    ("nested model", Person),
    ("list of models", list[Person]),
    ("recursive model", Node),
    ("recursive model with _ in name", Tree_Node),
    ("recursive generic model", Tree[int]),
    ("model holding recursive models", Forest),
    ("literal", Literal["red", "green", "blue"]),
    ("enum", Color),
    ("int enum", Priority),
    ("constrained fields", Bounds),
    ("huge bounds", Huge),
    ("quotes and backslashes in literals", Quoted),
    ("quote in a property name", Aliased),
    ("dict[str, int]", dict[str, int]),
    ("dict[str, Any]", dict[str, Any]),
    ("list[Any]", list[Any]),
    ("tuple[int, str]", tuple[int, str]),
    ("tuple[int, ...]", tuple[int, ...]),
    ("named tuple", Point),
    ("typed dict", Movie),
    ("decimal", Decimal),
    ("optional scalar", int | None),
    ("bool", bool),
    ("float", float),
]


def output_schema(tp: Any) -> dict[str, Any]:
    """The JSON schema Kagura asks the model for, for return type ``tp``."""
    from kagura._output import OutputSpec

    spec = OutputSpec(tp)
    assert spec.schema is not None
    return spec.schema.schema


async def _run_embedded(max_tokens: int) -> None:
    """One agent call per case on the embedded model; a JSON line per case on stdout."""
    from kagura import agent
    from kagura.errors import KaguraError

    for name, tp in CORPUS:

        async def example() -> None:
            """Give an example value."""

        example.__annotations__["return"] = tp
        call = agent(
            model="local/smollm2",
            max_tokens=max_tokens,
            temperature=0,
            output_retries=0,
            retry=False,
        )(example)
        print(json.dumps({"start": name}), flush=True)
        try:
            value = await call()
        except KaguraError as exc:
            outcome = {"case": name, "error": type(exc).__name__, "detail": str(exc)[:200]}
        else:
            outcome = {"case": name, "value": repr(value)[:200]}
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    asyncio.run(_run_embedded(int(sys.argv[1])))
