"""An agent's docstring is its prompt: a sandboxed Jinja2 template checked against the signature."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import SecurityError

from kagura import UsageError, agent, workflow
from kagura.errors import TemplateError
from kagura.testing import FakeModel


def last_prompt(fake: FakeModel) -> str:
    return str(fake.requests[-1].messages[-1]["content"])


async def test_prompt_is_rendered_from_bound_arguments_with_defaults() -> None:
    fake = FakeModel(["ok"])

    @agent(model=fake)
    async def greet(name: str, greeting: str = "Hello", *, punctuation: str = "!") -> str:
        """{{ greeting }}, {{ name }}{{ punctuation }}"""

    assert await greet("Ada") == "ok"
    assert last_prompt(fake) == "Hello, Ada!"
    await greet("Ada", "Hi", punctuation="?")
    assert last_prompt(fake) == "Hi, Ada?"
    await greet(greeting="Hey", name="Bob")
    assert last_prompt(fake) == "Hey, Bob!"


def test_render_shows_the_prompt_without_calling_the_model() -> None:
    fake = FakeModel()

    @agent(model=fake)
    async def summarise(text: str, words: int = 10) -> str:
        """Summarise in {{ words }} words:
        {{ text }}"""

    assert summarise.render("the text") == "Summarise in 10 words:\nthe text"
    assert fake.requests == []


async def test_jinja_control_flow_and_filters() -> None:
    fake = FakeModel()

    @agent(model=fake)
    async def listing(items: list[str], shout: bool = False) -> str:
        """{% for item in items %}- {{ item | upper if shout else item }}
        {% endfor %}{% if not items %}nothing{% endif %}"""

    assert listing.render(["a", "b"], shout=True) == "- A\n- B\n"
    assert listing.render([]) == "nothing"


def test_docstring_is_dedented() -> None:
    @agent(model=FakeModel())
    async def indented(x: str) -> str:
        """
        First line {{ x }}.
            Indented line.
        """

    assert indented.render("X") == "First line X.\n    Indented line."


def test_unknown_template_variable_fails_at_decoration_naming_it() -> None:
    with pytest.raises(TemplateError) as info:

        @agent(model=FakeModel())
        async def typo(text: str) -> str:
            """Summarise {{ txt }} for {{ audience }}."""

    message = str(info.value)
    assert "txt" in message
    assert "audience" in message
    assert "typo" in message


def test_template_variables_from_kwargs_are_allowed() -> None:
    @agent(model=FakeModel())
    async def flexible(text: str, **extra: str) -> str:
        """{{ text }} in {{ language }}"""

    assert flexible.render("hi", language="French") == "hi in French"


def test_missing_docstring_is_a_clear_template_error() -> None:
    with pytest.raises(TemplateError, match="no docstring"):

        @agent(model=FakeModel())
        async def undocumented(text: str) -> str:
            pass


def test_blank_docstring_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="no docstring"):

        @agent(model=FakeModel())
        async def blank(text: str) -> str:
            """ """


def test_template_syntax_error_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match=r"invalid prompt template.*\{% raw %\}"):

        @agent(model=FakeModel())
        async def broken(text: str) -> str:
            """Summarise {{ text"""


def test_template_error_is_a_usage_error() -> None:
    with pytest.raises(UsageError):

        @agent(model=FakeModel())
        async def broken(text: str) -> str:
            """{{ nope }}"""


async def test_undefined_attribute_fails_loudly_at_render() -> None:
    fake = FakeModel()

    @agent(model=fake)
    async def profile(user: dict[str, str]) -> str:
        """Name: {{ user.nmae }}"""

    with pytest.raises(TemplateError, match="nmae") as caught:
        await profile({"name": "Ada"})
    assert isinstance(caught.value.__cause__, jinja2.UndefinedError)
    assert fake.requests == []


async def test_sandbox_blocks_dunder_access() -> None:
    fake = FakeModel()

    @agent(model=fake)
    async def escape(x: str) -> str:
        """{{ x.__class__.__mro__ }}"""

    with pytest.raises(TemplateError) as caught:
        await escape("anything")
    assert isinstance(caught.value.__cause__, SecurityError)
    assert fake.requests == []


async def test_sandbox_bounds_what_an_argument_may_make_a_prompt_repeat_or_raise() -> None:
    # A width from the arguments would otherwise have one prompt take all the memory there is.
    fake = FakeModel()

    @agent(model=fake)
    async def ruled(width: int, title: str) -> str:
        """{{ "-" * width }} {{ title * 2 }} {{ [0] * 2 }} {{ 6 * 7 }}"""

    @agent(model=fake)
    async def power(exponent: int) -> str:
        """{{ 2 ** exponent }}"""

    assert await ruled(3, "ab") == "--- abab [0, 0] 42"
    assert await power(10) == "1024"
    with pytest.raises(TemplateError, match="1 items repeated 10000000000 times is more than the "):
        await ruled(10**10, "ab")

    @agent(model=fake)
    async def raw(data: bytes, times: int) -> str:
        """{{ times * data }}"""

    with pytest.raises(TemplateError, match="2 items repeated 50000000 times is more than the "):
        await raw(b"ab", 50_000_000)
    with pytest.raises(TemplateError, match="2 \\*\\* 2000000 has more than the 1,000,000 bits"):
        await power(2_000_000)
    assert len(fake.requests) == 2


def shaped(template: str) -> Any:
    """An agent whose prompt is ``template``, over whatever keywords it is given."""

    async def shape(**values: Any) -> str: ...

    shape.__doc__ = template
    return agent(model=FakeModel())(shape)


HUGE = 10**15  # a width no process could build a string of: refused before it is tried
MEGA = "x" * 1_000_000
KILO = "x" * 1_000


@pytest.mark.parametrize(
    ("template", "values"),
    [
        ("{{ text|indent(n, true) }}", {"text": "a\nb", "n": HUGE}),
        ("{{ text|center(n) }}", {"text": "a", "n": HUGE}),
        ("{{ '%*s'|format(n, text) }}", {"text": "a", "n": HUGE}),
        ("{{ '%0999999999999d'|format(1) }}", {}),
        ("{{ '%*s' % (n, text) }}", {"text": "a", "n": HUGE}),
        ("{{ '{:>{}}'.format(text, n) }}", {"text": "a", "n": HUGE}),
        ("{{ '{x:.{n}f}'.format_map({'x': 1.5, 'n': n}) }}", {"n": HUGE}),
        ("{{ text.center(n) }}", {"text": "a", "n": HUGE}),
        ("{{ text.ljust(n) }}{{ text.rjust(n) }}", {"text": "a", "n": HUGE}),
        ("{{ text.zfill(n) }}", {"text": "1", "n": HUGE}),
        ("{{ text.expandtabs(n) }}", {"text": "a\tb", "n": HUGE}),
        ("{{ text|replace('a', sep) }}", {"text": MEGA.replace("x", "a"), "sep": MEGA}),
        ("{{ text.replace('a', sep) }}", {"text": MEGA.replace("x", "a"), "sep": MEGA}),
        ("{{ range(100000)|join(sep) }}", {"sep": MEGA}),
        ("{{ sep.join(range(100000)|map('string')) }}", {"sep": MEGA}),
        ("{{ ([text] * 1000000)|join }}", {"text": MEGA}),  # the same string, many times
        ("{{ text|wordwrap(1, wrapstring=sep) }}", {"text": "a" * 20_000, "sep": MEGA}),
        ("{{ data|tojson(n) }}", {"data": [1], "n": HUGE}),
        ("{{ [1]|batch(n, 0)|list }}", {"n": HUGE}),
        ("{{ [1]|slice(n)|first }}", {"n": 2_000_000}),
        ("{{ ([big] * 3)|sum(start=[])|length }}", {"big": [0] * 1_000_000}),
        ("{{ text|urlize(target=sep) }}", {"text": "a.com b.com", "sep": MEGA}),
        ("{{ text.translate({97: sep}) }}", {"text": "aa", "sep": MEGA}),
        # The same string or list given many times over: made as many times.
        ("{{ ([text] * 2000)|length }}", {"text": KILO}),
        ("{{ (items|join(attribute='s'))|length }}", {"items": [{"s": KILO}] * 2000}),
        ("{{ items|sum(attribute='v', start=[])|length }}", {"items": [{"v": [0] * 600_000}] * 3}),
        ("{{ (('{}' * 2000).format(*items))|length }}", {"items": [KILO] * 2000}),
        ("{{ (('{0}' * 2000).format(text))|length }}", {"text": KILO}),
        ("{{ ((fmt * 2000) % items)|length }}", {"fmt": "%s", "items": (KILO,) * 2000}),
        ("{{ ((fmt * 2000)|format(*items))|length }}", {"fmt": "%s", "items": [KILO] * 2000}),
        ("{{ ((fmt * 2000) % {'a': text})|length }}", {"fmt": "%(a)s", "text": KILO}),
        # A key is read to the ')' that balances its '(', as Python reads it.
        ("{{ (fmt % {'a(b)c': 'x'})|length }}", {"fmt": "%(a(b)c)2000000s"}),
        ("{{ (fmt % (n, data))|length }}", {"fmt": b"%*s", "n": 2_000_000, "data": b"x"}),
        ("{{ (text|safe).center(n)|length }}", {"text": "a", "n": 2_000_000}),  # Markup's
        ("{{ lipsum(n)|length }}", {"n": 2000}),
    ],
)
def test_sandbox_bounds_what_a_filter_or_method_may_add_before_building_it(
    template: str, values: dict[str, Any]
) -> None:
    # A width or separator from the arguments would otherwise have one prompt take all the
    # memory there is, as "*" would without its bound.
    with pytest.raises(TemplateError, match="more than the 1,000,000 a prompt may make"):
        shaped(template).render(**values)


def test_filters_and_methods_bounded_still_shape_long_documents() -> None:
    # What is added is bounded, not the result: a long document may still be indented, etc.
    lines = [f"line {n} with a-hyphen" for n in range(100_000)]  # 2 MB of text
    document = "\n".join(lines)
    assert shaped("{{ text|indent(4, true) }}").render(text=document).count("    line") == 100_000
    assert shaped("{{ lines|join('\n') }}").render(lines=lines) == document
    assert len(shaped("{{ text|wordwrap(40) }}").render(text=document)) >= len(document)
    assert shaped("{{ text|replace('line', 'Line') }}").render(text=document).startswith("Line 0")
    assert shaped("{{ '%5.1f|%-4s|'|format(x, 'a') }}{{ '%*d' % (3, 7) }}").render(x=2) == (
        "  2.0|a   |  7"
    )
    assert shaped("{{ '{:>6}{:.2f}'.format('ab', 1) }}{{ 'a'.center(3) }}").render() == (
        "    ab1.00 a "
    )
    assert shaped("{{ data|tojson(2) }}").render(data={"a": [1, 2]}) == (
        '{\n  "a": [\n    1,\n    2\n  ]\n}'
    )
    assert shaped("{{ [1, 2, 3]|batch(2, 0)|list }} {{ [[1], [2]]|sum(start=[]) }}").render() == (
        "[[1, 2], [3, 0]] [1, 2]"
    )
    rows = [{"name": "a", "v": [1]}, {"name": "b", "v": [2, 3]}]
    summed = "{{ rows|join(',', attribute='name') }} {{ rows|sum(attribute='v', start=[]) }}"
    assert shaped(summed).render(rows=rows) == "a,b [1, 2, 3]"
    assert shaped("{{ ((0,), (1,))|sum(start=()) }}").render() == "(0, 1)"
    formats = (
        "{{ '{0}-{0}'.format(t) }} {{ '%(a)s%(a)s' % {'a': t} }} {{ '%(a(b))s' % {'a(b)': 1} }}"
    )
    assert shaped(formats).render(t="ab") == "ab-ab abab 1"
    assert shaped("{{ (t|safe).center(6) }}|{{ lipsum(1, false, 5, 6)|length > 0 }}").render(
        t="ab"
    ) == ("  ab  |True")


class Document:
    def __init__(self, body: str) -> None:
        self.body = body


def test_sandbox_bounds_what_a_prompt_writes_as_a_whole() -> None:
    # However each piece is made, a loop may not write an argument without end: the prompt and
    # each block the template joins is counted as it is written.
    for template in [
        "{% for i in range(n) %}{{ text }}{% endfor %}",
        "{% for i in range(n) %}{{ text.center(1000) }}{% endfor %}",
        "{% set all %}{% for i in range(n) %}{{ text }}{% endfor %}{% endset %}{{ all|length }}",
        "{% macro m() %}{% for i in range(n) %}{{ text }}{% endfor %}{% endmacro %}"
        "{{ m()|length }}",
    ]:
        with pytest.raises(TemplateError, match="more than the 50,000,000 a prompt may hold"):
            shaped(template).render(text=KILO, n=60_000)
    # Long documents are written as they are, however the template reaches them.
    lines = [f"line {n} with a-hyphen" for n in range(100_000)]
    document = "\n".join(lines)
    written = "{% for line in lines %}{{ line }}\n{% endfor %}{{ text }}"
    assert shaped(written).render(lines=lines, text=document) == f"{document}\n{document}"
    rows = [{"name": f"n{n}", "score": n / 7} for n in range(20_000)]
    table = shaped("{% for row in rows %}{{ row.name }}: {{ row.score }}\n{% endfor %}")
    assert table.render(rows=rows).count("\n") == 20_000
    docs = [Document(KILO * 100) for _ in range(30)]  # 3,000,000 characters through attributes
    joined = shaped("{% for doc in docs %}{{ doc.body }}{% endfor %}").render(docs=docs)
    assert len(joined) == 3_000_000


class Account:
    def delete(self) -> None:
        raise AssertionError("must not be reachable from a template")

    delete.unsafe_callable = True  # type: ignore[attr-defined]


async def test_sandbox_blocks_unsafe_callables() -> None:
    @agent(model=FakeModel())
    async def attack(account: Account) -> str:
        """{{ account.delete() }}"""

    with pytest.raises(TemplateError) as caught:
        await attack(Account())
    assert isinstance(caught.value.__cause__, SecurityError)


async def test_body_with_code_warns_once_at_decoration() -> None:
    fake = FakeModel()
    with pytest.warns(UserWarning, match="never executed") as record:

        @agent(model=fake)
        async def chatty(x: str) -> str:
            """Say {{ x }}"""
            return x.upper()

    assert len(record) == 1
    assert "chatty" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert await chatty("hi") == "Say hi"  # the body is not run, and no second warning


def test_an_agent_run_with_exec_under_another_file_s_name_is_made(tmp_path: Path) -> None:
    """As the README's examples are run: the file named holds text, not the code, so the body
    cannot be looked at (Python 3.13's tokenizer raised TokenError on an apostrophe there)."""
    notes = tmp_path / "NOTES.md"
    notes.write_text("# Notes\n\nIt's the reader's guide: don't run this.\n" * 3)
    code = (
        "from kagura import agent\n"
        "from kagura.testing import FakeModel\n"
        "@agent(model=FakeModel())\n"
        "async def greet(name: str) -> str:\n"
        "    '''Say hello to {{ name }}'''\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(code, str(notes), "exec"), namespace)
    assert namespace["greet"].render("Ada") == "Say hello to Ada"


def test_docstring_pass_and_ellipsis_bodies_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @agent(model=FakeModel())
        async def only_doc(x: str) -> str:
            """{{ x }}"""

        @agent(model=FakeModel())
        async def with_pass(x: str) -> str:
            """{{ x }}"""
            pass

        @agent(model=FakeModel())
        async def with_ellipsis(x: str) -> str:
            """{{ x }}"""
            ...

    assert only_doc.render("a") == with_pass.render("a") == with_ellipsis.render("a") == "a"


def test_raise_not_implemented_error_bodies_do_not_warn() -> None:
    """The README's "Type checkers" ends a body with it, so mypy and pyright accept the
    return type: that is a placeholder, not code meant to run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @agent(model=FakeModel())
        async def bare(x: str) -> str:
            """{{ x }}"""
            raise NotImplementedError

        @agent(model=FakeModel())
        async def called(x: str) -> str:
            """{{ x }}"""
            raise NotImplementedError()

        @agent(model=FakeModel())
        async def with_message(x: str) -> str:
            """{{ x }}"""
            raise NotImplementedError("the docstring is the prompt")

    assert bare.render("a") == called.render("a") == with_message.render("a") == "a"


def test_other_raises_and_code_after_not_implemented_error_still_warn() -> None:
    with pytest.warns(UserWarning, match="never executed"):

        @agent(model=FakeModel())
        async def other_error(x: str) -> str:
            """{{ x }}"""
            raise ValueError(x)

    with pytest.warns(UserWarning, match="never executed"):

        @agent(model=FakeModel())
        async def computed_message(x: str) -> str:
            """{{ x }}"""
            raise NotImplementedError(x.upper())

    with pytest.warns(UserWarning, match="never executed"):

        @agent(model=FakeModel())
        async def code_before(x: str) -> str:
            """{{ x }}"""
            x = x.strip()
            raise NotImplementedError


def test_non_async_function_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="async def"):

        @agent
        def sync_agent(x: str) -> str:  # type: ignore[arg-type]
            """{{ x }}"""
            return x

    with pytest.raises(UsageError, match="async def"):

        @workflow
        def sync_workflow(x: str) -> str:  # type: ignore[arg-type]
            return x


async def test_wrong_arguments_raise_type_error_naming_the_agent() -> None:
    fake = FakeModel()

    @agent(model=fake)
    async def needs_two(a: str, b: str) -> str:
        """{{ a }} {{ b }}"""

    with pytest.raises(TypeError, match="needs_two"):
        await needs_two("only one")  # type: ignore[call-arg]
    assert fake.requests == []


@pytest.mark.parametrize(
    "value", ["text", "", None, 0, 3.5, True, [1, "a"], {"k": "v"}, ("t",), "x\n{{ y }}"]
)
def test_plain_templates_render_exactly_as_jinja_does(value: object) -> None:
    @agent(model=FakeModel())
    async def speak(a: object, b: object = "default") -> str:
        """Line one: {{ a }}
        then {{b}} and {{ a }} again.
        """

    assert speak.prompt._pieces is not None  # the fast path is taken
    arguments = {"a": value, "b": value}
    assert speak.prompt.render(arguments) == speak.prompt._template.render(arguments)


def test_templates_with_filters_or_tags_use_jinja() -> None:
    @agent(model=FakeModel())
    async def shout(words: list[str]) -> str:
        """{% for w in words %}{{ w | upper }} {% endfor %}"""

    assert shout.prompt._pieces is None
    assert shout.render(["a", "b"]) == "A B "


@pytest.mark.parametrize(
    ("template", "said"),
    [
        ("{{ text | bulleted }}", "line 1: No filter named 'bulleted'"),
        ("Items:\n{% if text is nonempty %}{{ text }}{% endif %}", "line 2: there is no test"),
        ("{% include 'header.txt' %}{{ text }}", "includes another template"),
        ("{% extends 'base.txt' %}", "extends another template"),
        ("{% import 'macros.txt' as m %}{{ text }}", "imports another template"),
        ("{% from 'macros.txt' import m %}{{ text }}", "imports from another template"),
    ],
)
def test_what_jinja_finds_only_when_compiling_or_loading_is_said_at_decoration(
    template: str, said: str
) -> None:
    async def summarise(text: str) -> str: ...

    summarise.__doc__ = template
    with pytest.raises(TemplateError, match=said):
        agent(model=FakeModel())(summarise)


class Exploding:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@pytest.mark.parametrize(
    ("template", "value", "said"),
    [
        ("Items: {{ text | join(', ') }}", 5, "TypeError: 'int' object is not iterable"),
        ("Mean: {{ text | sum / text | length }}", [], "ZeroDivisionError: division by zero"),
        ("Say {{ text }}", Exploding(), "RuntimeError: no text for you"),
        ("Say {{ text | upper }}", Exploding(), "RuntimeError: no text for you"),
    ],
)
async def test_an_error_while_rendering_is_a_template_error_naming_the_agent(
    template: str, value: object, said: str
) -> None:
    async def summarise(text: Any) -> str: ...

    summarise.__doc__ = template
    fake = FakeModel()
    summary = agent(model=fake)(summarise)
    with pytest.raises(
        TemplateError, match=rf"agent '.*summarise'.*rendering the prompt failed: {said}"
    ):
        await summary(value)
    assert fake.requests == []
