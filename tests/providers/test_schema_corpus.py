"""No return type's schema takes llama.cpp down: grammar_schema on a corpus of real return types.

llama-cpp-python turns a JSON schema into a GBNF grammar that llama.cpp parses, and a grammar
llama.cpp refuses crashes the process (a segmentation fault) in the embedded model and in
llama-cpp-python's server alike. Anything that could crash runs in a child process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from kagura.providers._grammar import MAX_REPEAT, grammar_pattern, grammar_schema

from .. import _llamacpp
from .schema_corpus import CORPUS, IsoDay, output_schema

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = [name for name, _ in CORPUS]
MAX_TOKENS = 64


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child that imports this checkout's kagura and the tests package."""
    paths = [str(REPO_ROOT / "src"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=REPO_ROOT,
        check=False,
    )


def died(result: subprocess.CompletedProcess[str]) -> str:
    return f"the child exited with {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}"


# --- grammar_schema itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "translated"),
    [
        (r"^\d{4}-\d{2}-\d{2}$", "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"),
        (r"^\w+$", "^[0-9A-Za-z_]+$"),
        (r"^\S*$", r"^[^\x20\x09\x0A\x0D\x0C\x0B]*$"),
        (r"^[^\s\d]+$", r"^[^\x20\x09\x0A\x0D\x0C\x0B0-9]+$"),
        (r"^[\Dx]$", "^([^0-9]|[x])$"),
        (r"^v\d+\.\d+$", r"^v[0-9]+[\x2E][0-9]+$"),
        (r"^[\w.-]+$", r"^[0-9A-Za-z_\x2E\x2D]+$"),
        (r"^cat|dog$", "^(cat|dog)$"),  # the converter mis-reads a top-level alternation
        (r"^(?:ab)+c{2,}d*?$", "^(ab)+c{2,}d*$"),
        (r"^a{0,5000}b{3000}$", "^a{0,}b{1000,}$"),
        (r"^$", "^$"),
        (r"^é[A-Z]$", "^é[A-Z]$"),
    ],
)
def test_patterns_are_translated(pattern: str, translated: str) -> None:
    assert grammar_pattern(pattern) == translated


@pytest.mark.parametrize(
    "pattern",
    [
        r"\d+",  # not anchored: JSON schema patterns search
        r"^\d+",
        r"^a\$",  # an escaped $ is no anchor
        r"^(?=.*\d).+$",
        r"^(?P<year>\d{4})$",
        r"^\bfoo$",
        r"^(a)\1$",
        r"^\p{L}+$",
        r"^[[:alpha:]]$",
        r"^[a-z&&[^aeiou]]$",
        r"^[^\D]$",
        r'^say "hi"$',  # the converter would put a bare quote in the JSON string
        r"^a\\b$",
        r"^a\tb$",
        r"^a++$",
        r"^(a$",
        r"^a)$",
        r"^*a$",
        r"^a{3,1}$",
        r"^a{x}$",
        r"^a^b$",
    ],
)
def test_patterns_that_cannot_be_said_are_dropped(pattern: str) -> None:
    assert grammar_pattern(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "matching", "other"),
    [
        (r"^\d{4}-\d{2}-\d{2}$", ["2024-01-31"], ["2024-1-31", "2024-01-31x"]),
        (r"^[\w.-]+@\w+\.com$", ["a.b-c_d@x.com"], ["a@x.org", "a b@x.com"]),
        (r"^[^\s\d]+$", ["abc"], ["a c", "a1"]),
        (r"^[\Dx]{2}$", ["ab", "x-"], ["a1", "1x"]),
        (r"^cat|dog$", ["cat", "dog"], ["catdog", "ca"]),
        (r"^\+?[\d ()-]{7,15}$", ["+1 (555) 123-45"], ["555", "+1-555-CALL-NOW"]),
    ],
)
def test_translated_patterns_match_what_the_originals_match(
    pattern: str, matching: list[str], other: list[str]
) -> None:
    translated = grammar_pattern(pattern)
    assert translated is not None
    for text in matching:
        assert re.fullmatch(translated, text), text
    for text in other:
        assert not re.fullmatch(translated, text), text


def test_the_input_is_not_modified_and_the_output_shares_nothing_with_it() -> None:
    schema = output_schema(CORPUS[CASES.index("quotes and backslashes in literals")][1])
    schema["properties"]["extra"] = {"enum": [["a", {"b": 1}]]}
    before = json.dumps(schema, sort_keys=True)
    out = grammar_schema(schema)
    assert json.dumps(schema, sort_keys=True) == before
    out["properties"]["extra"]["enum"][0][1]["b"] = 2
    assert json.dumps(schema, sort_keys=True) == before


def test_what_is_kept_translated_and_dropped() -> None:
    out = grammar_schema(
        {
            "title": "Example",
            "type": "object",
            "properties": {
                "day": {"type": "string", "pattern": r"^\d{4}$", "description": "a year"},
                "any": {},
                "at": {"type": "string", "format": "date-time"},
                "on": {"type": "string", "format": "date"},
                "mail": {"type": "string", "format": "email", "maxLength": 5000},
                "n": {"type": "integer", "minimum": 1, "maximum": 9},
                "quote": {"type": "string", "enum": ['"', "x"]},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2000},
                "one": {"allOf": [{"$ref": "#/$defs/Tree_Node"}]},
            },
            "required": ["day", "nope"],
            "$defs": {"Tree_Node": {"type": "object", "properties": {}}},
        }
    )
    assert out == {
        "type": "object",
        "properties": {
            "day": {"type": "string", "pattern": "^[0-9]{4}$"},
            "any": {"type": ["object", "array", "string", "number", "boolean", "null"]},
            "at": {
                "type": "string",
                "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                "([.][0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?$",
            },
            "on": {"type": "string", "format": "date"},
            "mail": {"type": "string"},
            "n": {"type": "integer"},
            "quote": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": MAX_REPEAT},
            "one": {"$ref": "#/$defs/def0-Tree-Node"},
        },
        "required": ["day"],
        "$defs": {"def0-Tree-Node": {"type": "object", "properties": {}}},
    }


def test_a_recursive_root_is_inlined_next_to_its_definitions() -> None:
    schema = output_schema(CORPUS[CASES.index("recursive model with _ in name")][1])
    assert schema["$ref"] == "#/$defs/Tree_Node"
    out = grammar_schema(schema)
    assert "$ref" not in out and out["type"] == "object"
    assert out["properties"]["children"]["items"] == {"$ref": "#/$defs/def0-Tree-Node"}
    assert out["$defs"]["def0-Tree-Node"]["properties"] == out["properties"]


ODD_SCHEMAS: list[Any] = [
    {},
    {"type": "nonsense"},
    {"type": ["string", {"x": 1}]},
    {"anyOf": []},
    {"$ref": "#/$defs/missing"},
    {"$ref": "https://example.com/schema.json"},
    {"$ref": 3},
    {"properties": {"a": True, "b": False}, "required": [{"x": 1}, "a"]},
    {"type": "array", "items": True},
    {"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}},
    {"type": "string", "minLength": -1, "maxLength": True, "pattern": 5, "format": ["date"]},
    {"enum": [float("nan"), {1, 2}]},
    {"const": "\U0001f600"},
    {"$defs": [1], "definitions": {"a/b~c": {"type": "integer"}}, "$ref": "#/definitions/a~1b~0c"},
    {"allOf": [{"type": "integer"}, {"minimum": 1}]},
]


@pytest.mark.parametrize(
    "schema", ODD_SCHEMAS, ids=[json.dumps(s, default=str) for s in ODD_SCHEMAS]
)
def test_odd_schemas_do_not_raise(schema: Any) -> None:
    out = grammar_schema(schema)
    json.dumps(out)  # plain JSON, whatever came in


CHECK_GRAMMARS = """
import json, sys
from kagura.providers.local import schema_grammar
for line in sys.stdin:
    print(json.dumps(schema_grammar(json.loads(line)) is not None), flush=True)
"""


def test_every_grammar_schema_builds_a_grammar_llama_cpp_accepts() -> None:
    pytest.importorskip("llama_cpp", reason="the [local] extra is not installed")
    schemas = [grammar_schema(output_schema(tp)) for _, tp in CORPUS]
    schemas += [grammar_schema(s) for s in ODD_SCHEMAS]
    lines = "".join(json.dumps(s) + "\n" for s in schemas)
    result = subprocess.run(
        [sys.executable, "-c", CHECK_GRAMMARS],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, died(result)
    built = [json.loads(line) for line in result.stdout.splitlines()]
    names = CASES + [json.dumps(s, default=str) for s in ODD_SCHEMAS]
    assert dict(zip(names, built, strict=True)) == dict.fromkeys(names, True), result.stderr


def test_schemas_that_crash_llama_cpp_unchanged_are_refused_by_the_guard() -> None:
    """The guard of the embedded model (schema_grammar) sees the grammars llama.cpp refuses,
    which llama-cpp-python would hand to a NULL sampler."""
    pytest.importorskip("llama_cpp", reason="the [local] extra is not installed")
    code = (
        "import sys, json\n"
        "from kagura.providers.local import schema_grammar, response_format\n"
        "schema = json.loads(sys.argv[1])\n"
        "assert schema_grammar(schema) is None\n"
        "print(json.dumps(response_format(schema)))\n"
    )
    result = run_child(code, json.dumps(output_schema(IsoDay)))
    assert result.returncode == 0, died(result)
    assert "unknown escape" in result.stderr  # llama.cpp's complaint, printed by its C parser
    assert json.loads(result.stdout) == {
        "type": "json_object",
        "schema": grammar_schema(output_schema(IsoDay)),
    }


# --- the embedded model -------------------------------------------------------------------------

FALLBACK = """
import asyncio, json
from kagura import agent
from kagura.errors import KaguraError
from kagura.providers import local
from tests.providers.schema_corpus import IsoDay

local.grammar_schema = lambda schema: schema  # as if grammar_schema missed something

@agent(model="local/smollm2", max_tokens=32, temperature=0, output_retries=0, retry=False)
async def day() -> IsoDay:
    \"\"\"Give an example value.\"\"\"

print(json.dumps(local.response_format(IsoDay.model_json_schema())))
try:
    print(repr(asyncio.run(day())))
except KaguraError as exc:
    print(type(exc).__name__)
"""


@pytest.mark.local_model
def test_a_grammar_llama_cpp_refuses_falls_back_to_plain_json_on_the_embedded_model() -> None:
    pytest.importorskip("llama_cpp", reason="the [local] extra is not installed")
    result = run_child(FALLBACK)
    assert result.returncode == 0, died(result)
    first, outcome = result.stdout.splitlines()
    assert json.loads(first) == {"type": "json_object"}
    assert outcome.startswith("IsoDay(") or outcome == "OutputParseError", outcome


@pytest.mark.local_model
@pytest.mark.timeout(900)
def test_every_return_type_ends_in_a_value_or_an_exception_on_the_embedded_model() -> None:
    pytest.importorskip("llama_cpp", reason="the [local] extra is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "tests.providers.schema_corpus", str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        timeout=840,
        # One model instance with both cores: the cases run one after another.
        env=child_env(KAGURA_LOCAL_WORKERS="1"),
        cwd=REPO_ROOT,
        check=False,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    outcomes = {line["case"]: line for line in lines if "case" in line}
    report = "\n".join(f"  {name}: {_outcome(outcomes.get(name))}" for name in CASES)
    started = [line["start"] for line in lines if "start" in line]
    assert result.returncode == 0, (
        f"the process died with {result.returncode} during {started[-1] if started else '?'!r}"
        f"\n{report}\n{result.stderr[-3000:]}"
    )
    print(f"embedded model, per case:\n{report}")
    assert list(outcomes) == CASES, report


def _outcome(line: dict[str, Any] | None) -> str:
    if line is None:
        return "(no outcome)"
    if "value" in line:
        return f"value {line['value']}"
    return f"{line['error']}: {line['detail'].splitlines()[0]}"


# --- a llama.cpp server -------------------------------------------------------------------------


def _chat_body(schema: dict[str, Any], response_schema: dict[str, Any]) -> dict[str, Any]:
    text = "Give an example value.\n\nAnswer with only a JSON value that follows this JSON schema: "
    return {
        "messages": [{"role": "user", "content": text + json.dumps(schema)}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "response_format": {"type": "json_object", "schema": response_schema},
    }


@pytest.mark.local_model
@pytest.mark.timeout(900)
def test_every_return_type_gets_an_http_answer_from_a_llama_cpp_server(
    llamacpp_server: _llamacpp.LlamaCppServer,
) -> None:
    answers: dict[str, str] = {}
    with httpx.Client(base_url=llamacpp_server.base_url, timeout=120) as client:
        for name, tp in CORPUS:
            schema = output_schema(tp)
            try:
                response = client.post(
                    "/chat/completions", json=_chat_body(schema, grammar_schema(schema))
                )
            except httpx.TransportError as exc:
                pytest.fail(
                    f"no HTTP answer for {name!r} ({exc!r}); server alive: "
                    f"{llamacpp_server.alive()}\n{llamacpp_server.log_tail()}"
                )
            answers[name] = f"{response.status_code} {_content(response)}"
    print("llama.cpp server, per case:\n" + "\n".join(f"  {n}: {a}" for n, a in answers.items()))
    assert llamacpp_server.alive(), llamacpp_server.log_tail()
    assert all(a.startswith("200 ") for a in answers.values()), answers


def _content(response: httpx.Response) -> str:
    try:
        return repr(response.json()["choices"][0]["message"]["content"][:100])
    except (ValueError, LookupError, TypeError):
        return response.text[:100]


@pytest.mark.local_model
@pytest.mark.timeout(300)
def test_without_grammar_schema_a_regex_class_kills_the_server(tmp_path: Path) -> None:
    """Why grammar_schema exists: llama-cpp-python's own server dies of pydantic's ``\\d``."""
    server = _llamacpp.start_server(_llamacpp.gguf_or_skip(), tmp_path)
    try:
        schema = output_schema(IsoDay)
        with pytest.raises(httpx.TransportError):
            httpx.post(
                f"{server.base_url}/chat/completions", json=_chat_body(schema, schema), timeout=120
            )
        assert server.process.wait(timeout=60) == -11  # SIGSEGV
        assert "unknown escape at \\d" in server.log_tail(100_000)
    finally:
        server.stop()
