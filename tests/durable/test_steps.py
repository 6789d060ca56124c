"""What a durable run journals: every agent call, tool call and ``kagura.step``, each under a
step key that is the same on every execution of the same code, with a hash of its inputs."""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from kagura import UsageError, agent, step, tool, workflow
from kagura.durable import Journal
from kagura.durable._run import input_hash
from kagura.errors import NonDeterminismError, ProviderError, RunFailedError
from kagura.providers import ModelRequest, ToolCall
from kagura.testing import FakeModel, Reply, override_model

from . import workflows
from .conftest import WAIT_TIMEOUT, lines, respond, wait_until

FANOUT_STEPS = {
    "fanout/charge#0": ("charge", "step"),
    "fanout/draft#0": ("draft", "agent"),
    "fanout/draft#1": ("draft", "agent"),
    "fanout/review#0": ("review", "agent"),
    "fanout/shopper#0": ("shopper", "agent"),
    "fanout/shopper#0/price#0": ("price", "tool"),
    "fanout/count#0": ("count", "step"),
}


def first_draft_last(request: ModelRequest) -> str | Reply:
    """Answers the first of the gathered drafts after the second, so that the calls finish (and
    are journaled) out of the order they started in."""
    answer = respond(request)
    if "apples one" in str(request.messages[-1].get("content")):
        return Reply(str(answer), delay=0.05)
    return answer


async def test_every_step_is_journaled_under_a_stable_key(journal: Journal, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.txt")
    model = FakeModel([first_draft_last] * 100)
    with override_model(model):
        first = await workflows.fanout.run("apples", ledger, run_id="first")
        second = await workflows.fanout.run("apples", ledger, run_id="second")

    assert first == second
    assert first["drafts"] == ["Draft a note about apples one.", "Draft a note about apples two."]
    assert first["bought"] == "bought: apples costs 3"
    assert first["receipt"] == "receipt for apples"
    assert len(model.requests) == 2 * 5  # two drafts, review, shopper twice (tool round)

    steps = journal.load_steps("first")
    again = journal.load_steps("second")
    assert {key: (s.name, s.kind) for key, s in steps.items()} == FANOUT_STEPS
    # Same keys, same inputs and outputs: the second run is the first one again, step for step.
    assert {k: (s.name, s.kind, s.input_hash, s.output) for k, s in steps.items()} == {
        k: (s.name, s.kind, s.input_hash, s.output) for k, s in again.items()
    }

    # Each key belongs to its call site, not to the order calls finished in.
    assert steps["fanout/draft#0"].input_hash == input_hash({"topic": "apples one"})
    assert steps["fanout/draft#1"].input_hash == input_hash({"topic": "apples two"})
    assert json.loads(steps["fanout/draft#0"].output or "") == "Draft a note about apples one."
    assert steps["fanout/review#0"].input_hash == input_hash(
        {"text": "Draft a note about apples one."}
    )
    # A tool call's inputs: what its arguments' JSON stands for, keys sorted.
    assert steps["fanout/shopper#0/price#0"].input_hash == input_hash(
        {"item": "apples"}, sort_keys=True
    )
    assert json.loads(steps["fanout/shopper#0/price#0"].output or "") == "apples costs 3"
    assert steps["fanout/charge#0"].input_hash == input_hash(
        {"args": (ledger, "apples"), "kwargs": {}}
    )
    assert json.loads(steps["fanout/count#0"].output or "") == first["length"]
    assert all(len(s.input_hash) == 64 for s in steps.values())

    for run_id in ("first", "second"):
        record = journal.get_run(run_id)
        assert record is not None
        assert (record.status, record.workflow, record.steps) == ("completed", "fanout", 7)
        assert record.target == "tests.durable.workflows:fanout"
        assert json.loads(record.result or "") == first
    assert lines(ledger) == ["charged apples"] * 2


async def test_kagura_durable_makes_every_workflow_durable(
    journal: Journal, model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await workflows.plain("pears") == "Review this: DRAFT A NOTE ABOUT PEARS."
    assert journal.list_runs() == []  # not durable unless asked

    monkeypatch.setenv("KAGURA_DURABLE", "1")
    assert await workflows.plain("pears") == "Review this: DRAFT A NOTE ABOUT PEARS."
    assert await workflows.never_durable("pears") == "Draft a note about pears."  # opted out

    (record,) = journal.list_runs()
    assert (record.workflow, record.status, record.steps) == ("plain", "completed", 3)
    assert len(record.run_id) == 32  # a fresh id per call
    assert set(journal.load_steps(record.run_id)) == {
        "plain/draft#0",
        "plain/check#0",
        "plain/review#0",
    }


async def test_nested_workflows_are_steps_of_the_outer_run(
    journal: Journal, model: FakeModel
) -> None:
    results = [await workflows.nested.run("figs", run_id=f"nested-{n}") for n in range(2)]
    assert (
        results[0]
        == results[1]
        == [
            "Review this: DRAFT A NOTE ABOUT FIGS.",
            "Review this: DRAFT A NOTE ABOUT FIGS!.",
        ]
    )
    assert [r.run_id for r in journal.list_runs()] == ["nested-1", "nested-0"]  # newest first
    keys = [journal.load_steps(f"nested-{n}") for n in range(2)]
    assert (
        set(keys[0])
        == set(keys[1])
        == {
            f"nested/plain#{n}/{step}"
            for n in (0, 1)
            for step in ("draft#0", "check#0", "review#0")
        }
    )
    assert keys[0]["nested/plain#1/draft#0"].input_hash == input_hash({"topic": "figs!"})


@pytest.mark.parametrize(
    ("kind", "journaled"),
    [("step", "charge"), ("agent", "draft"), ("tool", "price")],
)
async def test_a_result_reaches_the_workflow_only_once_it_is_committed(
    kind: str,
    journaled: str,
    journal: Journal,
    model: FakeModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The journal's writer is held inside the commit of the step's row until the test lets it
    # go: a workflow (or a model, for a tool's result) that went on before then would have done
    # so with the step not on disk, and a crash there would run it again.
    committing, release = threading.Event(), threading.Event()
    write_batch = Journal._write_batch

    def held(self: Journal, batch: list[Any]) -> None:
        if any(item.values.get("name") == journaled for item in batch):
            committing.set()
            release.wait(WAIT_TIMEOUT)
        write_batch(self, batch)

    monkeypatch.setattr(Journal, "_write_batch", held)
    workflows.NOTED.clear()
    run = asyncio.create_task(
        workflows.see_then_note.run(kind, str(tmp_path / "ledger.txt"), run_id="held")
    )
    await asyncio.to_thread(committing.wait, WAIT_TIMEOUT)
    assert committing.is_set()
    requests_then = len(model.requests)
    for _ in range(20):  # the workflow has had its turns: it still waits for the commit
        await asyncio.sleep(0)
    assert workflows.NOTED == []
    assert len(model.requests) == requests_then  # a tool's result went nowhere yet either
    assert not run.done()

    release.set()
    result, noted = await run, workflows.NOTED
    assert noted == [result]
    assert any(s.name == journaled for s in journal.load_steps("held").values())


@pytest.mark.usefixtures("journal")
@pytest.mark.parametrize(
    ("flow", "answer", "said"),
    [
        (workflows.signs_in, '{"user": "ann", "password": "hunter2"}', "reads back as another"),
        (workflows.rates, '{"score": 5}', "reads back as another value"),
    ],
)
async def test_a_result_that_would_not_replay_as_itself_is_refused_when_journaled(
    journal: Journal, flow: Any, answer: str, said: str
) -> None:
    # Journaled as it is, the run would go on with it now and get another value (or an
    # error) only when resumed: said now, before the workflow sees it.
    with override_model(FakeModel([answer])), pytest.raises(UsageError, match=said):
        await flow.run("x", run_id="lossy")
    assert journal.load_steps("lossy") == {}
    assert journal.get_run("lossy").status == "failed"


@pytest.mark.usefixtures("journal")
async def test_an_agent_s_arguments_with_no_json_are_journaled_by_a_hash(journal: Journal) -> None:
    with override_model(FakeModel(["a PNG", "another PNG"])):
        assert await workflows.describes.run(4, run_id="png") == "a PNG"
        assert await workflows.describes.run(4, run_id="png") == "a PNG"  # from the journal
    (step,) = journal.load_steps("png").values()
    assert step.input_hash == input_hash({"image": b"\x89PNG\x00\x00\x00\x00"})
    looped: dict[str, Any] = {}
    looped["self"] = looped
    assert input_hash(looped) == input_hash(looped)


class Reading(BaseModel):
    sensor: str
    value: float


async def test_an_answer_of_nan_is_asked_again_in_a_durable_run_as_outside_one(
    journal: Journal,
) -> None:
    # JSON has no NaN, so the journal could not keep it: it was taken outside a durable run,
    # and refused inside one as a result that "cannot be journaled". Now it is an invalid
    # answer in both, asked again.
    @agent(model="fake")
    async def read(text: str) -> Reading:
        """Read the sensor value from {{ text }}."""

    @workflow(durable=True)
    async def readings(text: str) -> float:
        return (await read(text)).value

    fake = FakeModel(['{"sensor": "t1", "value": NaN}', '{"sensor": "t1", "value": 2.5}'])
    with override_model(fake):
        assert await readings.run("t1 reads 2.5", run_id="nan") == 2.5
    assert "Input should be a finite number" in fake.requests[1].messages[-1]["content"]
    (journaled,) = journal.load_steps("nan").values()
    assert json.loads(journaled.output or "") == {"sensor": "t1", "value": 2.5}


async def test_tool_arguments_nested_too_deeply_go_back_to_the_model_in_a_durable_run(
    journal: Journal,
) -> None:
    @tool
    def lookup(q: str) -> str:
        """Look q up."""
        return "found"

    @agent(model="fake", tools=[lookup])
    async def finds(q: str) -> str:
        """{{ q }}"""

    @workflow(durable=True)
    async def finding(q: str) -> str:
        return await finds(q)

    fake = FakeModel([Reply(tool_calls=(ToolCall("c1", "lookup", "[" * 3000),)), "done"])
    with override_model(fake):
        assert await finding.run("q", run_id="deep") == "done"
    (told,) = [m for m in fake.requests[1].messages if m["role"] == "tool"]
    assert told["content"].startswith("Error: ValidationError: ")
    assert journal.get_run("deep").status == "completed"


async def test_tool_arguments_with_half_a_character_are_hashed_as_json_loads_reads_them(
    journal: Journal,
) -> None:
    # A lone surrogate, which pydantic's JSON reader refuses: the tool takes it, and the
    # journal hashes what json.loads reads, as it did before (hashing the text instead would
    # make a run journaled then run the call again on resume).
    @tool
    def lookup(q: str) -> str:
        """Look q up."""
        return "found"

    @agent(model="fake", tools=[lookup])
    async def finds(q: str) -> str:
        """{{ q }}"""

    @workflow(durable=True)
    async def finding(q: str) -> str:
        return await finds(q)

    arguments = '{"q": "smile \\ud83d"}'
    fake = FakeModel([Reply(tool_calls=(ToolCall("c1", "lookup", arguments),)), "done"])
    with override_model(fake):
        assert await finding.run("q", run_id="half") == "done"
    (hashed,) = [s.input_hash for s in journal.load_steps("half").values() if s.kind == "tool"]
    assert hashed == input_hash(json.loads(arguments), sort_keys=True)
    (told,) = [m for m in fake.requests[1].messages if m["role"] == "tool"]
    assert told["content"] == "found"


async def test_a_step_result_with_no_json_is_a_usage_error_naming_the_step(db: str) -> None:
    @workflow(durable=True)
    async def lists() -> list[str]:
        return await step("list", lambda: [os.fsdecode(b"report-\xff.txt")])

    with pytest.raises(UsageError, match=r"step 'list': its result cannot be journaled"):
        await lists.run(run_id="no-json")


def labelled(text: str, *, name: str, fn: str) -> str:
    return f"{name}/{fn}/{text}"


async def test_a_step_s_function_may_take_keywords_called_name_and_fn(journal: Journal) -> None:
    # step's own name and fn are positional-only, whatever type checkers are told of its
    # arguments (fn's, through a ParamSpec).
    @workflow(durable=True)
    async def label() -> str:
        return await step("label", labelled, "x", name="n", fn="f")

    assert await label.run(run_id="keywords") == "n/f/x"
    assert [record.name for record in journal.load_steps("keywords").values()] == ["label"]


def look_up(city: str) -> str:
    return None  # type: ignore[return-value]  # its annotation says otherwise


async def test_a_step_result_not_of_its_return_type_is_refused_when_it_is_journaled(
    journal: Journal,
) -> None:
    # A replay reads the result through the annotation: kept, it would fail every resume, which
    # would blame changed code.
    @workflow(durable=True)
    async def lookup() -> str:
        return await step("look up", look_up, "Lyon")

    said = (
        "step 'look up': its result null does not read back as its return type str (value: "
        "Input should be a valid string), so a resumed run could not replay it; return what the "
        "annotation says, or change it"
    )
    with pytest.raises(UsageError, match=f"^{re.escape(said)}$"):
        await lookup.run(run_id="lie")
    assert journal.load_steps("lie") == {}


async def test_a_step_named_for_a_url_with_its_password_keeps_the_password_out(
    journal: Journal,
) -> None:
    # As the README names steps for the data they handle: f"store {doc}".
    calls: list[str] = []
    url = "https://svc:Sup3rS3cretPw@files.example/report"
    gate: list[str] = []

    def upload(where: str) -> str:
        calls.append(where)
        return "uploaded"

    @workflow(durable=True)
    async def publish(where: str) -> str:
        done = await step(f"upload {where}", upload, where)
        if not gate:
            raise RuntimeError("not yet")
        return done

    with pytest.raises(RuntimeError, match="not yet"):
        await publish.run(url, run_id="upload")
    named = "upload https://svc:[REDACTED]@files.example/report"
    steps = journal.load_steps("upload")
    assert [(key, s.name) for key, s in steps.items()] == [(f"publish/{named}#0", named)]
    gate.append("open")
    assert await publish.resume("upload") == "uploaded"
    assert calls == [url]  # the resumed run found its step under the same, redacted, name


async def test_a_step_name_longer_once_redacted_is_refused_as_it_would_be_stored() -> None:
    # "pwd=abcd" becomes "pwd=[REDACTED]": 251 characters then hold 257, more than the store's
    # name columns, which PostgreSQL would refuse in a commit other runs' steps share.
    @workflow
    async def named(name: str) -> str:
        return await step(name, str.upper, "x")

    with pytest.raises(UsageError, match=r"is 257 characters long; names are at most 255"):
        await named("s" * 242 + " pwd=abcd")


async def test_a_steps_function_is_not_kept_alive_by_the_step(db: str) -> None:
    # Its signature and validator are kept weakly: a closure, and the object of a bound method,
    # go with the run that made them.
    class Ledger:
        def total(self) -> int:
            return 3

    async def run_once(run_id: str) -> weakref.ref[Ledger]:
        ledger = Ledger()

        def plus(n: int) -> int:
            return ledger.total() + n

        @workflow(durable=True, name="kept")
        async def kept() -> int:
            return await step("plus", plus, 1) + await step("total", ledger.total)

        assert await kept.run(run_id=run_id) == 7
        return weakref.ref(ledger)

    gone = [await run_once(f"kept-{n}") for n in range(3)]
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]


SET_ARGUMENT = """
import asyncio, os, sys
from kagura import step, workflow

def record(tags: set[str]) -> list[str]:
    return sorted(tags)

@workflow(durable=True)
async def tagged(tags: set[str]) -> list[str]:
    first = await step("first", record, tags)
    if os.environ.get("CRASH"):
        os._exit(9)
    return first + await step("second", record, tags)

if __name__ == "__main__":
    mode, run_id = sys.argv[1], sys.argv[2]
    if mode == "run":
        print(asyncio.run(tagged.run({"alpha", "beta", "gamma", "delta", "eps"}, run_id=run_id)))
    else:
        print(asyncio.run(tagged.resume(run_id)))
"""


def test_a_set_in_a_run_s_inputs_is_the_same_in_every_process(db: str, tmp_path: Path) -> None:
    # A set's order is its hash seed's: one process's JSON of it is not the next one's.
    script = tmp_path / "tagged.py"
    script.write_text(SET_ARGUMENT)

    def run(seed: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args],
            env={
                **os.environ,
                "KAGURA_DB": db,
                "KAGURA_RECORD": "0",
                "PYTHONHASHSEED": seed,
                **env,
            },
            capture_output=True,
            text=True,
            timeout=WAIT_TIMEOUT,
            check=False,
        )

    tags = sorted(["alpha", "beta", "gamma", "delta", "eps"])
    assert run("1", "run", "crashed", CRASH="1").returncode == 9
    resumed = run("2", "resume", "crashed")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(tags + tags)
    # A finished run asked for again by a process of another seed: the same arguments.
    assert run("1", "run", "done").returncode == 0
    again = run("2", "run", "done")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(tags + tags)


SET_IN_MODEL = """
import asyncio, dataclasses, os, sys
from pydantic import BaseModel
from kagura import step, workflow

class Order(BaseModel):
    id: int
    tags: set[str]

@dataclasses.dataclass(frozen=True)
class Basket:
    orders: list[Order]
    codes: frozenset[str]

def charge(order: Order, basket: Basket) -> str:
    with open(os.environ["LEDGER"], "a") as ledger:
        ledger.write(f"charged {order.id}\\n")
    return f"receipt {order.id}"

@workflow(durable=True)
async def checkout(order: Order, basket: Basket) -> str:
    receipt = await step("charge", charge, order, basket)
    if os.environ.get("CRASH"):
        os._exit(9)
    return receipt

if __name__ == "__main__":
    mode, run_id = sys.argv[1], sys.argv[2]
    words = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}
    order = Order(id=1, tags=words)
    basket = Basket([order], frozenset(words))
    if mode == "run":
        print(asyncio.run(checkout.run(order, basket, run_id=run_id)))
    else:
        print(asyncio.run(checkout.resume(run_id)))
"""


def test_a_set_in_a_model_or_dataclass_is_the_same_in_every_process(
    db: str, tmp_path: Path
) -> None:
    # Pydantic writes a model's set in its order, which is the hash seed's: sorted, so that a
    # step's inputs and the run's arguments are the same whichever process asks.
    script = tmp_path / "checkout.py"
    script.write_text(SET_IN_MODEL)
    ledger = tmp_path / "ledger"

    def run(seed: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args],
            env={
                **os.environ,
                "KAGURA_DB": db,
                "KAGURA_RECORD": "0",
                "LEDGER": str(ledger),
                "PYTHONHASHSEED": seed,
                **env,
            },
            capture_output=True,
            text=True,
            timeout=WAIT_TIMEOUT,
            check=False,
        )

    assert run("1", "run", "crashed", CRASH="1").returncode == 9
    resumed = run("2", "resume", "crashed")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "receipt 1"
    assert lines(ledger) == ["charged 1"]  # its step replayed, not run again
    # A finished run asked for again by a process of another seed: the same arguments.
    assert run("1", "run", "done").returncode == 0
    for seed in ("2", "3"):
        again = run(seed, "run", "done")
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "receipt 1"
    assert lines(ledger) == ["charged 1", "charged 1"]


HASHES = """
import dataclasses, json
from typing import TypedDict
import pydantic.dataclasses
from pydantic import BaseModel, ConfigDict, Field, RootModel, computed_field
from kagura.durable._run import canonical, input_hash
import pydantic_core

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]

class Tag(BaseModel, frozen=True):
    name: str
    aka: frozenset[str]

class Order(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int = Field(alias="Id")
    tags: set[str]
    labels: set[Tag]
    mixed: set[int | str | None | tuple[int, str]]
    by: dict[str, set[str]]

    @computed_field
    @property
    def upper(self) -> set[str]:
        return {tag.upper() for tag in self.tags}

@dataclasses.dataclass(frozen=True)
class Basket:
    codes: frozenset[str]
    nested: tuple[frozenset[str], ...]

@pydantic.dataclasses.dataclass
class Aliased:
    tags: set[str] = Field(alias="Tags")

class Typed(TypedDict):
    tags: set[str]
    basket: Basket

tags = frozenset(WORDS)
order = Order(
    Id=1,
    tags=tags,
    labels={Tag(name=word, aka=frozenset(WORDS[:n])) for n, word in enumerate(WORDS)},
    mixed={1, "a", None, "b", 2, (3, "c")},
    by={"x": tags},
    more=set(WORDS),
)
basket = Basket(frozenset(WORDS), (frozenset(WORDS), frozenset(WORDS[:3])))
values = [
    order,
    basket,
    Aliased(Tags=tags),
    Typed(tags=tags, basket=basket),
    RootModel[set[str]](tags),
    {"orders": [order], "by code": {frozenset(WORDS): 1, 2: {3, "x"}}},
    frozenset({frozenset(WORDS), frozenset(WORDS[:2]), Tag(name="x", aka=tags)}),
]
print(json.dumps([input_hash(value) for value in values]))
print(pydantic_core.to_json(canonical({"order": order, "basket": basket})).decode())
"""


def test_sets_anywhere_in_inputs_hash_the_same_in_every_process(tmp_path: Path) -> None:
    # In models, dataclasses (pydantic's and plain), TypedDicts, root models, computed fields,
    # extra fields, sets of sets and of mixed types, and dict keys.
    script = tmp_path / "hashes.py"
    script.write_text(HASHES)

    def hashes(seed: str) -> str:
        done = subprocess.run(
            [sys.executable, str(script)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=WAIT_TIMEOUT,
            check=True,
        )
        return done.stdout

    first = hashes("1")
    assert '"tags":["alpha","beta","delta","epsilon","eta","gamma","theta","zeta"]' in first
    assert all(hashes(seed) == first for seed in ("2", "3", "4"))


class Colour(Enum):
    RED = "red"


class Item(BaseModel):
    name: str = Field(alias="Name")
    count: int
    colour: Colour = Colour.RED
    when: datetime.datetime = datetime.datetime(2024, 5, 1, 12, 30)


class Solo(BaseModel):
    id: int
    tags: set[str]


@dataclass
class Line:
    sku: str
    items: list[Item]


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


class Ids(BaseModel):
    ids: set[int]


class Pairs(BaseModel):
    pairs: frozenset[tuple[int, int]]
    reals: set[float]


@dataclass
class Nums:
    nums: set[int]


def test_inputs_hashed_the_same_in_every_process_before_keep_their_hashes() -> None:
    # Journals written then must still resume: these hashes are those of the version before
    # sets in models were sorted.
    item = Item(Name="pen", count=2)
    hashed = [
        ({"topic": "apples"}, False),
        ({"args": (1, "two", 3.5, None, True), "kwargs": {"on": datetime.date(2024, 5, 1)}}, False),
        ({"args": ({"b", "a", "c"},), "kwargs": {}}, False),
        ({"mixed": {3, "x", None, (1, 2), frozenset({2, 1})}}, False),
        ({"args": (item,), "kwargs": {"line": Line("s-1", [item])}}, False),
        ({"args": (Solo(id=1, tags={"solo"}),), "kwargs": {}}, False),
        ({1: "int", "1": "str", None: "none"}, False),
        ({"b": 1, "a": {"d": 2, "c": 3}}, True),
        ({"image": b"\x89PNG\x00\x00"}, False),
        ({"args": (Opaque(), [Opaque()]), "kwargs": {}}, False),
        # Sets of numbers iterate in the same order in every process: not re-sorted in models
        # and dataclasses either (by their JSON, 10 would come before 2).
        ({"args": (Ids(ids={2, 10}),), "kwargs": {}}, False),
        ({"args": (Ids(ids={-1, 1}),), "kwargs": {}}, False),
        ({"args": (Nums({2, 10, 33, 1000}),), "kwargs": {}}, False),
        (
            {
                "args": (Pairs(pairs=frozenset({(2, 1), (10, 3)}), reals={10.0, 2.5, -7.25}),),
                "kwargs": {},
            },
            False,
        ),
        ({frozenset({1, 2}): "a", "k": {"q": Ids(ids={7, 100})}}, False),
    ]
    assert [input_hash(value, sort_keys=sort_keys) for value, sort_keys in hashed] == [
        "4775fff59780ee5fd093cf7ea145ecc3e3c520144615b9450be99f0b51c6c1a3",
        "e409b3323db38efc5a086e9112fc9d46f1b6f73926a7a7c13ebc6ebf4a033148",
        "b5bfb9924f6be4915883435523e6f28f12495ca66f758f9eca413619eb6ef8b9",
        "e9af715dda8410526be043559440d95bab982d66131c77d8999fb5c1cd3d7ad0",
        "d4a9722829c5a2ea3a7d1a22af6b1af909fdb58b11bc024cd2359a625cbc7118",
        "2b9cf85eb40cfc5c7a52e8dd872f5a1cc9ea16d196c039e4a9c327bed7b1539e",
        "876a2a72abba26afa36e7798954e467631a9079e0cfe43f15e5a1d62f1a82855",
        "78d48859c3252943aab7306f76c80f3f07783582e05ab8f944ce0696f2dbfc67",
        "f52a2cbf201c1263b1227e301433c1d17b6ee33f1a2084e4e73e8b1a807691df",
        "cabf82056a80db61a18dd556d4de4cd9e230fa18f37c83e9fa2b096378b84aec",
        "fd60893437a18c0953471acd088c2e6f987f817647959ee06330c09fa59629bd",
        "6ef8880a352ce6339e7f59d2ecbc77e4c6f01da4ab7c7a3eec4009420e68f5e6",
        "545b30132315554e93a460c1bcc3b2239f5ca4196b8dd2b745c7579402d6df91",
        "f07a8d43e934f9954ec64fccbca04c5308ae034abc3f196788c0149d5e8fcfa8",
        "a5f2371df91b2a771749ede78b43098c25669896f4c9d5cb648b2ebbb2ae4c6e",
    ]


async def test_a_tool_called_again_with_its_arguments_in_another_order_is_not_run_again(
    journal: Journal,
) -> None:
    # The agent runs again on resume, and its model need not write the same call the same way.
    charged: list[tuple[str, int]] = []
    fail_after_the_tool = {"on": True}

    @tool
    def charge(customer: str, amount: int) -> str:
        """Charge a customer."""
        charged.append((customer, amount))
        return "charged"

    def answer(request: ModelRequest) -> str | Reply:
        if request.messages[-1].get("role") == "tool":
            if fail_after_the_tool["on"]:
                raise ProviderError("bad request", status_code=400)  # not retried
            return "done"
        order = ("customer", "amount") if fail_after_the_tool["on"] else ("amount", "customer")
        given = {"customer": "ann", "amount": 5}
        arguments = json.dumps({key: given[key] for key in order})
        return Reply(tool_calls=(ToolCall("call_1", "charge", arguments),))

    @agent(model=FakeModel([answer] * 10), tools=[charge])
    async def cashier(order: str) -> str:
        """Settle {{ order }}."""

    @workflow(durable=True)
    async def checkout(order: str) -> str:
        return await cashier(order)

    with pytest.raises(ProviderError):
        await checkout.run("ann's order", run_id="checkout")
    fail_after_the_tool["on"] = False
    assert await checkout.resume("checkout") == "done"
    assert charged == [("ann", 5)]


async def test_parallel_steps_started_in_another_order_on_resume_are_found_by_their_inputs(
    journal: Journal, tmp_path: Path
) -> None:
    # In the first run the slow document's summary comes last, so its store starts second; a
    # resumed run has both summaries from the journal at once, and starts the stores the other
    # way round.
    fast_stored = asyncio.Event()
    stored: list[str] = []

    async def summarise(doc: str) -> str:
        if doc == "slow" and not stored:
            await fast_stored.wait()
        return f"summary of {doc}"

    def store(doc: str) -> str:
        stored.append(doc)
        fast_stored.set()
        return f"id-{doc}"

    async def one(doc: str) -> str:
        await step("summarise", summarise, doc)
        return await step("store", store, doc)

    @workflow(durable=True)
    async def digest(docs: list[str], gate: str) -> list[str]:
        ids = await asyncio.gather(*(one(doc) for doc in docs))
        await step("gate", workflows.require_file, gate)
        return list(ids)

    gate = tmp_path / "gate"
    with pytest.raises(FileNotFoundError):
        await digest.run(["slow", "fast"], str(gate), run_id="digest")
    assert stored == ["fast", "slow"]
    gate.touch()
    assert await digest.resume("digest") == ["id-slow", "id-fast"]
    assert stored == ["fast", "slow"]  # neither stored again


def two_stages(named_apart: bool) -> tuple[Any, list[str], dict[str, bool]]:
    """A workflow of parallel branches, each a summary then a store, whose slow document's
    summary comes last (so its store starts second), and whose store of it fails while
    ``failing["on"]``: the run fails with the fast store journaled and the slow one not. On
    resume both summaries come from the journal at once, and the stores start the other way
    round. ``named_apart``: each store step named for its document, as a run's steps may be."""
    fast_stored = asyncio.Event()
    stored: list[str] = []
    failing = {"on": True}

    async def summarise(doc: str) -> str:
        if doc == "slow" and not stored:
            await fast_stored.wait()
        return f"summary of {doc}"

    def store(doc: str) -> str:
        if doc == "slow" and failing["on"]:
            raise ConnectionError("the store went away")
        stored.append(doc)
        fast_stored.set()
        return f"id-{doc}"

    async def one(doc: str) -> str:
        await step("summarise", summarise, doc)
        return await step(f"store {doc}" if named_apart else "store", store, doc)

    @workflow(durable=True)
    async def digest(docs: list[str]) -> list[str]:
        return list(await asyncio.gather(*(one(doc) for doc in docs)))

    return digest, stored, failing


async def test_parallel_steps_named_for_their_branch_resume_in_another_order(
    journal: Journal,
) -> None:
    # Before: the slow store, started first, was a new step at the place among the run's steps
    # where the journal has the fast one, and failed the run as a renamed step.
    digest, stored, failing = two_stages(named_apart=True)
    with pytest.raises(ConnectionError):
        await digest.run(["slow", "fast"], run_id="digest")
    assert stored == ["fast"]
    failing["on"] = False
    assert await digest.resume("digest") == ["id-slow", "id-fast"]
    assert stored == ["fast", "slow"]  # the fast one not stored again
    assert set(journal.load_steps("digest")) == {
        "digest/summarise#0",
        "digest/summarise#1",
        "digest/store fast#0",
        "digest/store slow#0",
    }


async def test_parallel_steps_of_one_name_journaled_in_part_fail_naming_the_fix(
    journal: Journal,
) -> None:
    # The slow store, started first on resume, finds the fast one's step under its number: it
    # cannot be told from another path, and the run fails before anything runs again.
    digest, stored, failing = two_stages(named_apart=False)
    with pytest.raises(ConnectionError):
        await digest.run(["slow", "fast"], run_id="digest")
    failing["on"] = False
    with pytest.raises(NonDeterminismError, match=r'give each its own name, such as step\(f"store'):
        await digest.resume("digest")
    assert stored == ["fast"]


async def test_parallel_calls_with_the_same_inputs_one_journaled_run_the_other_once(
    journal: Journal,
) -> None:
    made: list[int] = []
    failing = {"on": True}

    def make(n: int) -> int:
        made.append(n)
        if failing["on"] and len(made) == 2:
            raise ConnectionError("the second one failed")
        return len(made)

    async def branch() -> int:
        await asyncio.sleep(0)
        return await step("make", make, 1)

    @workflow(durable=True)
    async def twice() -> list[int]:
        return list(await asyncio.gather(branch(), branch()))

    with pytest.raises(ConnectionError):
        await twice.run(run_id="twice")
    failing["on"] = False
    # One call was journaled (its result, 1, is replayed); the other runs, once.
    assert sorted(await twice.resume("twice")) == [1, 3]
    assert made == [1, 1, 1]


async def test_calls_with_the_same_inputs_each_run_and_each_replay_their_own(
    journal: Journal,
) -> None:
    # A call journaled by this very execution is no sibling to answer a later one from.
    made: list[int] = []

    def make(n: int) -> int:
        made.append(n)
        return len(made)

    async def later() -> int:
        await asyncio.sleep(0)
        return await step("make", make, 1)

    @workflow(durable=True)
    async def thrice() -> list[int]:
        first = [await step("make", make, 1), await step("make", make, 1)]
        return first + list(await asyncio.gather(later(), later()))

    assert await thrice.run(run_id="thrice") == [1, 2, 3, 4]
    assert await thrice.resume("thrice") == [1, 2, 3, 4]
    assert made == [1, 1, 1, 1]


async def test_a_step_a_branch_finishes_after_its_run_failed_is_journaled(
    journal: Journal,
) -> None:
    # asyncio.gather leaves the other branches running when one fails: the late step's commit
    # was refused (the run had ended), and it ran again on resume.
    release = asyncio.Event()
    ran: list[str] = []
    failing = {"on": True}

    async def work(x: str) -> str:
        if failing["on"]:
            if x == "late":
                await release.wait()
            else:
                raise ConnectionError("the other branch failed")
        ran.append(x)
        return x

    async def branch(x: str) -> str:
        return await step("work", work, x)

    @workflow(durable=True)
    async def both(xs: list[str]) -> list[str]:
        return list(await asyncio.gather(*(branch(x) for x in xs)))

    with pytest.raises(ConnectionError):
        await both.run(["late", "bad"], run_id="late-step")
    release.set()
    await asyncio.to_thread(
        wait_until, lambda: "both/work#0" in journal.load_steps("late-step"), "the late step"
    )
    assert ran == ["late"]
    failing["on"] = False
    assert await both.resume("late-step") == ["late", "bad"]
    assert ran == ["late", "bad"]


async def test_a_run_result_with_no_json_fails_the_run_saying_so(journal: Journal) -> None:
    effects: list[str] = []

    @workflow(durable=True)
    async def raw() -> bytes:
        await step("effect", effects.append, "done")
        return b"\xff\x00raw"

    with pytest.raises(UsageError, match=r"durable workflow 'raw': its result cannot be journaled"):
        await raw.run(run_id="raw-result")
    record = journal.get_run("raw-result")
    assert record is not None and record.status == "failed"
    # Asked again: the reason at once (no wait for a run left running), the effect not again.
    with pytest.raises(RunFailedError, match="its result cannot be journaled"):
        await raw.run(run_id="raw-result")
    assert effects == ["done"]


async def test_a_run_result_not_of_its_return_type_fails_the_run_saying_so(
    journal: Journal,
) -> None:
    @workflow(durable=True)
    async def find() -> str:
        return None  # type: ignore[return-value]  # its annotation says otherwise

    said = "its result null does not read back as its return type str"
    with pytest.raises(UsageError, match=f"durable workflow 'find': {said}"):
        await find.run(run_id="result-lie")
    # Asked again: the reason, where it was pydantic's error every time.
    with pytest.raises(RunFailedError, match=said):
        await find.run(run_id="result-lie")


async def test_a_run_whose_return_annotation_has_no_validator_keeps_its_result_as_json(
    journal: Journal,
) -> None:
    class Totals(BaseModel):  # local: its name in the annotation resolves from nowhere
        n: int

    @workflow(durable=True)
    async def total() -> Totals:
        return Totals(n=1)

    assert await total.run(run_id="local-annotation") == Totals(n=1)
    record = journal.get_run("local-annotation")
    assert record is not None and (record.status, record.result) == ("completed", '{"n":1}')
    assert await total.run(run_id="local-annotation") == {"n": 1}  # asked again: its JSON


@pytest.mark.parametrize(
    ("run_id", "said"),
    [
        (" padded ", "starts or ends with a space"),
        ("a\rb", "holds a control or format character \\('\\\\r'\\)"),
        ("order\n7", "holds a control or format character"),
        ("nul\x00", "holds a control or format character"),
        ("\u202eright-to-left", "holds a control or format character"),
        ("\ud800", "lone surrogate"),
        ("-7f3a", "starts with '-'"),
        ("job~2", "ends as the span ids of a run's resumed executions do"),
    ],
)
def test_a_run_id_the_store_or_the_shell_cannot_keep_is_refused(run_id: str, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        Journal.run_id_for(run_id)
