"""``@agent``: an async function whose docstring is the prompt and whose return type is the result.

The call path, in order: bind the arguments, pick the model, take the answer from the journal
in a durable run that has it, else render the prompt and loop over model calls until the answer
parses into the return type, running any tools the model asks for in between. Each model call
is handed once to the resilience policies (:func:`kagura.resilience._policies.call_model`),
whose retry policy makes every attempt, the first included (:meth:`Retry.run_attempts`), each
through :func:`kagura._llm.attempt` to the provider.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import inspect
import json
import types
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, Unpack, overload

import pydantic_core

from . import _instrument, _prompted, parallel
from ._checks import count, real
from ._context import Span, checked_name, current_span
from ._instrument import span_event, span_finished, span_started, status_of
from ._output import OutputSpec, OutputValidationError, cut_off, read_json
from ._prompt import PromptTemplate, warn_if_body_has_code
from ._recording import ensure_recording
from ._redact import repr_of, str_of
from ._streaming import AgentStream, open_agent_stream
from ._tool import Tool, as_tool, resolved_hints, with_resolved_annotations
from ._usage import Usage
from .durable import _script
from .durable._run import DurableRun, current_durable_run, journaled
from .errors import (
    OutputParseError,
    RunError,
    ToolLoopError,
    UnsupportedRequestError,
    UsageError,
)
from .providers import (
    OUTPUT_MODES,
    TOOL_MODES,
    Message,
    Model,
    ModelRequest,
    OutputMode,
    ToolCall,
    ToolMode,
    resolve_model,
)
from .providers import _parse as _parse_model_string
from .resilience._fallback import record_fallback, tried_first
from .resilience._policies import (
    Policies,
    PolicyOptions,
    call_model,
    effective,
    with_total_timeout,
)

P = ParamSpec("P")
R = TypeVar("R")

AgentFunction = Callable[P, Coroutine[Any, Any, R]]


@dataclass(frozen=True, slots=True)
class AgentRun(Generic[R]):
    """One agent call's output and what it took (from :meth:`Agent.run`)."""

    output: R
    model: str  # the model that answered, after any fallback
    usage: Usage
    cost_usd: float | None  # None when some attempt's price is unknown
    span_id: str
    run_id: str


class AgentOptions(PolicyOptions, total=False):
    """The settings of an agent, as :func:`agent` and :class:`Agent` take them; all optional.

    The resilience settings (``retry``, ``timeout``, ``total_timeout``, ``breaker``,
    ``rate_limit``) are those of :class:`~kagura.resilience.PolicyOptions`: left unset, they come
    from the innermost ``@workflow(...)`` around the call, then from the library defaults.
    """

    #: The agent's name in recordings and errors (default: the function's).
    name: str | None
    #: A model string (see :mod:`kagura.providers`) or a model; default: ``KAGURA_MODEL``, else
    #: OpenAI's ``gpt-4o-mini`` with an ``OPENAI_API_KEY``, else the embedded local model.
    model: str | Model | None
    #: Sampling temperature, 0 to 2 (default: the provider's).
    temperature: float | None
    #: A cap on the answer's tokens (default: the provider's).
    max_tokens: int | None
    #: A system message sent before the prompt.
    system: str | None
    #: Tools the model may call: :class:`Tool` objects or plain functions.
    tools: Iterable[Tool[Any, Any] | Callable[..., Any]]
    #: How often an answer that does not parse into the return type is asked again (default 2).
    output_retries: int
    #: How many rounds of tool calls one call may take (default 5).
    max_tool_rounds: int
    #: The endpoint of an OpenAI-compatible server, and its key (default: from the environment).
    base_url: str | None
    api_key: str | None
    #: Models to try in turn when the agent's own fails with a run error (or one model).
    fallback: str | Model | Iterable[str | Model]
    #: How structured output is asked for, and how tools are offered (default: the endpoint's).
    output_mode: OutputMode | None
    tool_mode: ToolMode | None
    #: Keywords passed through to the provider untouched (``top_p``, ``seed``, ...).
    provider_kwargs: Mapping[str, Any] | None


class Agent(Generic[P, R]):
    """An LLM-backed async callable. Create it with :func:`agent`; its settings are those of
    :class:`AgentOptions`."""

    def __init__(self, fn: AgentFunction[P, R], **options: Unpack[AgentOptions]) -> None:
        unknown = options.keys() - AgentOptions.__optional_keys__
        if unknown:
            raise TypeError(
                f"Agent() got unexpected keyword arguments {', '.join(sorted(unknown))}; "
                f"provider keywords go in provider_kwargs="
            )
        name = options.get("name")
        model = options.get("model")
        temperature = options.get("temperature")
        max_tokens = options.get("max_tokens")
        output_retries = options.get("output_retries", 2)
        max_tool_rounds = options.get("max_tool_rounds", 5)
        output_mode = options.get("output_mode")
        tool_mode = options.get("tool_mode")
        base_url = options.get("base_url")
        api_key = options.get("api_key")
        if isinstance(fn, Agent):
            raise UsageError(
                f"{fn.name!r} is already an agent: apply @agent once, to its 'async def' (for "
                f"the same agent on another model, use {fn.name}.using(model))"
            )
        if not inspect.iscoroutinefunction(fn):
            raise UsageError(
                f"@agent needs an 'async def' function; {getattr(fn, '__qualname__', fn)!r} is not"
            )
        if temperature is not None and not 0 <= real(temperature, "temperature") <= 2:
            raise UsageError(f"temperature must be between 0 and 2, got {temperature}")
        if max_tokens is not None:
            count(max_tokens, "max_tokens", at_least=1)
        count(output_retries, "output_retries", at_least=0)
        count(max_tool_rounds, "max_tool_rounds", at_least=1)
        for setting in ("system", "base_url", "api_key"):
            value = options.get(setting)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{setting} must be a str, got {value!r}")
        if not (model is None or isinstance(model, str | Model)):
            raise UsageError(
                f"model must be a model string such as 'openai/gpt-4o-mini', or a "
                f"kagura.providers.Model, got {model!r}"
            )
        provider_kwargs = options.get("provider_kwargs")
        if provider_kwargs is not None and not isinstance(provider_kwargs, Mapping):
            raise UsageError(
                f"provider_kwargs must be a dict of keywords for the provider, got "
                f"{provider_kwargs!r}"
            )
        if output_mode is not None and output_mode not in OUTPUT_MODES:
            raise UsageError(
                f"output_mode must be one of {', '.join(map(repr, OUTPUT_MODES))} (or None for "
                f"the endpoint's default), got {output_mode!r}"
            )
        if tool_mode is not None and tool_mode not in TOOL_MODES:
            raise UsageError(
                f"tool_mode must be one of {', '.join(map(repr, TOOL_MODES))} (or None for "
                f"the endpoint's default), got {tool_mode!r}"
            )
        if isinstance(model, str):
            _parse_model_string(
                model, base_url, api_key
            )  # a bad model string fails here, not later
        functools.update_wrapper(self, fn)
        self._options = options  # to make it again in another process (__reduce__)
        self.fn = fn
        self.name: str = checked_name("agent", name or fn.__name__)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.system: str | None = options.get("system")
        self.output_retries = output_retries
        self.max_tool_rounds = max_tool_rounds
        self.output_mode: OutputMode | None = output_mode
        self.tool_mode: ToolMode | None = tool_mode
        self.base_url = base_url
        self._api_key = api_key
        self.provider_kwargs: dict[str, Any] = dict(options.get("provider_kwargs") or {})
        built = sorted(self.provider_kwargs.keys() & {"messages", "model", "tools"})
        if built:
            raise UsageError(
                f"agent {self.name!r}: provider_kwargs cannot set {', '.join(built)}: Kagura "
                f"sends them from the agent itself (its prompt, its model=, its tools=)"
            )
        if "stream" in self.provider_kwargs:
            raise UsageError(
                f"agent {self.name!r}: stream= is not an agent setting; stream a call with "
                f"{self.name}.stream(...), an async iterator of the answer as it arrives"
            )
        self.policies: Policies = Policies.from_options(options)
        self.fallback: tuple[str | Model, ...] = _fallback_models(options.get("fallback", ()))
        self.tools: dict[str, Tool[Any, Any]] = {}
        tools = options.get("tools", ())
        if isinstance(tools, str) or not isinstance(tools, Iterable):
            raise UsageError(
                f"tools must be a list of tools (functions, or @tool ones), got {tools!r}"
            )
        for t in tools:
            wrapped = as_tool(t)
            if wrapped.name in self.tools:
                raise UsageError(f"agent {self.name!r}: two tools are named {wrapped.name!r}")
            self.tools[wrapped.name] = wrapped
        self._tool_specs = [t.spec for t in self.tools.values()]
        self._signature = inspect.signature(fn)
        # For the common signature (plain parameters, no *args/**kwargs/positional-only), calls
        # are bound by a dict fill rather than Signature.bind, which costs several times more.
        plain = all(
            p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY
            for p in self._signature.parameters.values()
        )
        self._positional: tuple[str, ...] | None = (
            tuple(
                name
                for name, p in self._signature.parameters.items()
                if p.kind is p.POSITIONAL_OR_KEYWORD
            )
            if plain
            else None
        )
        self._defaults = {
            name: p.default
            for name, p in self._signature.parameters.items()
            if p.default is not p.empty
        }
        self._parameter_count = len(self._signature.parameters)
        #: The name of the only parameter, when a call may give it by position (else empty: no
        #: parameter is called that).
        self._sole: str = (
            positional[0]
            if (positional := self._positional)
            and len(positional) == 1
            and self._parameter_count == 1
            else ""
        )
        first = next(iter(self._signature.parameters), None)
        if first in ("self", "cls"):
            raise UsageError(
                f"agent {self.name!r} is written as a method (its first parameter is {first!r}), "
                f"but an agent is a function of its prompt's values: define it at module level, "
                f"and call it from the method"
            )
        self.prompt: PromptTemplate = PromptTemplate(fn, self._signature)
        return_type = _return_type(fn, self.name)
        if return_type is type(None):
            raise UsageError(
                f"agent {self.name!r} is annotated -> None, but an agent's result is the "
                f"model's answer: annotate it -> str for the text, or with the type the answer "
                f"should have"
            )
        self.output: OutputSpec = OutputSpec(return_type)
        warn_if_body_has_code(fn)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as the function and its settings, made again where it is unpickled (a Ray
        worker): the compiled prompt and output schema do not pickle. The ``api_key`` stays
        behind: a key must not travel in pickles (Ray keeps task arguments in its object store);
        the other process takes it from its own environment."""
        options = {name: value for name, value in self._options.items() if name != "api_key"}
        options.update(model=self.model, base_url=self.base_url, name=self.name)
        return _agent_from, (with_resolved_annotations(self.fn), options)

    def __copy__(self) -> Agent[P, R]:
        # A copy in this process shares what it can (``using``): not a new agent made from its
        # settings, as pickling makes one.
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def using(self, model: str | Model) -> Agent[P, R]:
        """This agent on another model (same prompt, type, tools and policies); for fallbacks."""
        _checked_model(
            model,
            f"{self.name}.using() takes a model string such as 'openai/gpt-4o-mini', or a "
            f"kagura.providers.Model",
        )
        twin = copy.copy(self)
        twin.model = model
        twin.base_url = None
        twin._api_key = None
        twin.name = f"{self.name}@{model if isinstance(model, str) else model.id}"
        return twin

    def render(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The prompt this call would send, without sending it."""
        return self.prompt.render(self._bind(args, kwargs))

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        positional = self._positional
        if not kwargs and positional is not None and len(args) == self._parameter_count:
            return dict(zip(positional, args, strict=True))  # every parameter, by position
        if positional is not None and len(args) <= len(positional):
            arguments = dict(self._defaults)
            arguments.update(zip(positional, args, strict=False))  # may be fewer args
            if kwargs:
                if any(name in arguments and name in positional[: len(args)] for name in kwargs):
                    return self._bind_slowly(args, kwargs)  # "multiple values": its error message
                arguments.update(kwargs)
            if len(arguments) == self._parameter_count and (
                not kwargs or all(name in self._signature.parameters for name in kwargs)
            ):
                # In signature order, as Signature.bind would give them.
                if kwargs or self._defaults:
                    return {name: arguments[name] for name in self._signature.parameters}
                return arguments
        return self._bind_slowly(args, kwargs)

    def _bind_slowly(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"agent {self.name!r}: {exc}") from None
        bound.apply_defaults()
        return bound.arguments

    # A plain method returning the call's coroutine: an ``async def`` here would wrap every call
    # in one more coroutine, on the hot path, only to await the inner one. The arguments are
    # bound now, as Python binds an ``async def``'s at the call (so a wrong call raises here).
    # What the coroutine keeps until it first runs matters: each object the garbage collector
    # counts, per call in flight, makes its collections more frequent, and thousands of calls
    # start at once in a fan-out. So an agent of one parameter called with one value keeps the
    # value alone (its dict is made when the call runs), any other call the dict of its bound
    # arguments rather than the args tuple and kwargs dict.
    # Its yield and send types are ``object``, not ``Any``: mypy answers ``Any`` for a call of an
    # overloaded function (``asyncio.gather`` of two types, ``kagura.parallel.gather``) given
    # an argument whose type holds an explicit ``Any``, while an ``async def``'s implicit one is
    # ignored. ``asyncio.run``, ``create_task`` and ``wait_for`` take it all the same.
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[object, object, R]:
        if self._sole and len(args) == 1 and not kwargs:
            return self._call(None, False, args[0])
        return self._call(self._bind(args, kwargs), False)

    #: Lets ``Retry`` (and anyone asking) know that calling an agent returns an awaitable.
    _is_async_callable = True

    async def run(self, *args: P.args, **kwargs: P.kwargs) -> AgentRun[R]:
        """Call the agent and return its output with what it took: the model that answered
        (after any fallback), tokens, cost and the ids of its recorded span and run."""
        output, answered_by, span = await self._call(self._bind(args, kwargs), True)
        return AgentRun(
            output,
            answered_by,
            Usage(span.prompt_tokens, span.completion_tokens),
            span.cost,
            span.span_id,
            span.run_id,
        )

    async def _call(self, arguments: dict[str, Any] | None, full: bool, sole: Any = None) -> Any:
        """The output for the bound ``arguments`` (``None``: ``sole`` is the value of the only
        parameter); with ``full``, (output, the model that answered, the call's span, which
        holds its totals)."""
        if arguments is None:
            arguments = {self._sole: sole}
        if _script.loads_in_progress:  # a workflow's module is being imported to resume a run
            _script.check_not_loading(f"agent {self.name!r} was called")
        ensure_recording()
        model = resolve_model(self.model, base_url=self.base_url, api_key=self._api_key)
        policies = effective(self.policies)
        parent = current_span.get()
        span = Span("agent", self.name, parent)
        # The call's span is made current only around the code that reads it: tools and the
        # resilience policies (see _run), and the whole call when it is a run of its own. The
        # rest of the call passes it explicitly: each set and reset leaves the task's context
        # new objects for the garbage collector to count, and a workflow's parallel calls each
        # run in a task of their own.
        token = current_span.set(span) if parent is None else None
        if _instrument.recording:
            span_started(span, {"model": model.id, "inputs": arguments})
        durable = current_durable_run.get()
        try:
            if durable is None:  # the hot path: no closures for a journal there is not
                result, answered_by = await self._answer(model, arguments, span, policies)
            else:
                (result, answered_by), replayed = await self._answer_journaled(
                    durable, model, arguments, span, policies
                )
                if replayed:
                    span_finished(
                        span, "completed", attributes={"output": result, "replayed": True}
                    )
                    return (result, answered_by, span) if full else result
        except BaseException as exc:
            span_finished(span, status_of(exc), exc)
            raise
        finally:
            if token is not None:
                current_span.reset(token)
        span_finished(
            span,
            "completed",
            attributes={"output": result, "answered_by": answered_by}
            if _instrument.recording
            else None,
        )
        return (result, answered_by, span) if full else result

    # No closures here: a variable that a nested function uses is made a cell at every call of
    # the function that holds it. A durable step waits for its commit with everything it made
    # still alive, and every object of it is one more for the garbage collector to count, so
    # lambdas and cells per step would make its full collections more frequent.
    def _answer_journaled(
        self,
        durable: DurableRun,
        model: Model,
        arguments: dict[str, Any],
        span: Span,
        policies: Policies,
    ) -> Awaitable[tuple[tuple[Any, str], bool]]:
        """The call's answer through the durable run's journal: ``(answer, replayed)``."""
        return journaled(
            durable,
            span,
            "agent",
            arguments,
            functools.partial(self._answer, model, arguments, span, policies),
            dump=self._dump_answer,
            load=self._load_answer,
            position=span.position,
        )

    def _dump_answer(self, answer: tuple[Any, str]) -> str:
        return self.output.dump(answer[0], f"agent {self.name!r}")

    def _load_answer(self, output: str | None) -> tuple[Any, str]:
        return self.output.load(output), "journal"

    # A plain method that returns what to await: a coroutine of its own would be one more frame,
    # kept with everything else while each call in flight waits for its model.
    def _answer(
        self, model: Model, arguments: dict[str, Any], span: Span, policies: Policies
    ) -> Awaitable[tuple[Any, str]]:
        """The call's output, and the model that answered: the agent's own, or a fallback."""
        prompt = self.prompt.render(arguments)
        total = policies.call_timeout()
        if total is None and not self.fallback:  # the common case, without extra layers
            model.check_ready()
            return self._run(model, prompt, span, policies)
        return with_total_timeout(total, self._run_chain(model, prompt, span, policies))

    async def _run_chain(
        self, model: Model, prompt: str, span: Span, policies: Policies
    ) -> tuple[Any, str]:
        """The primary model, then each fallback model in turn after a run failure. The error
        raised at the end carries the failures before it, as a :class:`Fallback`'s does."""
        chain = self.model_chain(model)
        failed: list[tuple[str, Exception]] = []
        for position, current in enumerate(chain):
            if position == 1:
                policies = policies.for_fallbacks()
            try:
                current.check_ready()
                return await self._run(current, prompt, span, policies)
            except RunError as exc:
                if position == len(chain) - 1:
                    tried_first(exc, failed, "model")
                    raise
                record_fallback(span, current.id, chain[position + 1].id, exc)
                failed.append((current.id, exc))
            except Exception as exc:  # a fallback model not ready (no API key), say
                tried_first(exc, failed, "model")
                raise
        raise AssertionError("unreachable: the chain is never empty")

    async def _run(
        self, model: Model, prompt: str, span: Span, policies: Policies
    ) -> tuple[Any, str]:
        """The output of ``model`` (tool rounds and output retries included), and its id."""
        prompted_tools = bool(self.tools) and (
            self.tool_mode == "prompted" or (self.tool_mode is None and not model.supports_tools)
        )
        request = self.first_request(model, prompt, prompted_tools)
        messages = request.messages
        first = len(messages) - 1
        tool_rounds = 0
        failures = 0
        prompted_results: dict[tuple[str, str], str] = {}
        while True:
            try:
                response = await call_model(model, request, span, policies)
            except UnsupportedRequestError as exc:
                if exc.feature != "tools" or prompted_tools or tool_rounds or self.tool_mode:
                    raise
                # The endpoint refused native tools before any ran: offer them in the prompt.
                span_event(span, "tools_prompted", error=str(exc))
                prompted_tools = True
                messages[first] = self._first_message(prompt, prompted_tools)
                request = self._request(model, messages, prompted_tools)
                continue
            calls = list(response.tool_calls) if response.tool_calls else []
            answer_text = response.text
            invalid: OutputValidationError | None = None
            if prompted_tools:
                try:
                    calls, answer_text = _prompted.read(response.text, tool_rounds, self.output)
                except OutputValidationError as exc:
                    invalid = exc
            if (
                response.finish_reason == "length"
                and not calls
                and (prompted_tools or not self.output.is_text)
            ):
                # Cut short, a structured answer is at best a prefix of the right one: never a
                # result. Asking again under the same limit would cut it short again.
                raise OutputParseError(
                    self.name, response.text, cut_off(request, model), failures + 1
                )
            if calls:
                tool_rounds += 1
                if tool_rounds > self.max_tool_rounds:
                    raise ToolLoopError(
                        f"agent {self.name!r}: the model was still calling tools after "
                        f"{self.max_tool_rounds} rounds (raise max_tool_rounds if that is expected)"
                    )
                if prompted_tools and _prompted.call_key(calls[0]) in prompted_results:
                    # Asked again for a result it has: give it back, and hold the next answer to
                    # the final answer's shape (where the endpoint constrains output).
                    result = prompted_results[_prompted.call_key(calls[0])]
                    messages.extend(_prompted.repeated(response.text, calls[0], result))
                    request = dataclasses.replace(
                        request,
                        output_schema=_prompted.answer_schema(self.output)
                        if model.supports_output_schema
                        else None,
                    )
                    continue
                results, replies = await self.tool_round(
                    response.text, calls, span, prompted=prompted_tools
                )
                if prompted_tools:
                    prompted_results.update(
                        zip(map(_prompted.call_key, calls), results, strict=True)
                    )
                    request = self._request(model, messages, prompted_tools)
                messages.extend(replies)
                continue
            if invalid is None:
                try:
                    return self.output.parse(answer_text), model.id
                except OutputValidationError as exc:
                    invalid = exc
            failures += 1
            if failures > self.output_retries:
                raise OutputParseError(self.name, response.text, str(invalid), failures)
            messages.append({"role": "assistant", "content": response.text})
            messages.append(
                {
                    "role": "user",
                    "content": f"That answer is not valid: {invalid}. Answer again."
                    + self.output.instructions,
                }
            )

    # -- the seam a streamed call (kagura._streaming) shares with an awaited one ---------------

    def model_chain(self, own: Model | None = None) -> list[Model]:
        """The models a call tries, in order: its own (after any test override; ``own`` when
        resolved already), then each fallback model."""
        if own is None:
            own = resolve_model(self.model, base_url=self.base_url, api_key=self._api_key)
        return [own, *(resolve_model(spec) for spec in self.fallback)]

    def first_request(
        self, model: Model, prompt: str, prompted_tools: bool = False
    ) -> ModelRequest:
        """A call's first request to ``model``: the system message, then the rendered
        ``prompt`` with the instructions for the answer's shape (or, with ``prompted_tools``,
        for calling the tools through the answer)."""
        messages: list[Message] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append(self._first_message(prompt, prompted_tools))
        return self._request(model, messages, prompted_tools)

    async def tool_round(
        self, text: str, calls: list[ToolCall], span: Span, *, prompted: bool = False
    ) -> tuple[list[str], list[Message]]:
        """Run the tool ``calls`` of an answer (``text``) at once, as children of ``span``:
        their results, and the messages that give them back to the model."""
        # Not asyncio.gather: a tool round ends with all its tools (one that ends the call, by
        # KeyboardInterrupt say, cancels the others, rather than leave them running after it).
        results = await parallel.gather(*(self._run_tool(call, span) for call in calls))
        return results, self._tool_messages(text, calls, results, prompted)

    def _first_message(self, prompt: str, prompted_tools: bool) -> Message:
        if prompted_tools:
            text = prompt + _prompted.instructions(self._tool_specs)
        else:
            text = prompt + self.output.instructions
        return {"role": "user", "content": text}

    def _request(self, model: Model, messages: list[Message], prompted_tools: bool) -> ModelRequest:
        schema = (
            _prompted.schema(self._tool_specs, self.output)
            if prompted_tools
            else self.output.schema
        )
        return ModelRequest(
            messages=messages,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            output_schema=schema if model.supports_output_schema else None,
            # The agent's own list, shared by its requests (empty when it has no tools): a fresh
            # empty one per request was one more object per call in flight.
            tools=[] if prompted_tools else self._tool_specs,
            extra=self.provider_kwargs,
            output_mode=self.output_mode,
        )

    async def _run_tool(self, call: ToolCall, parent: Span) -> str:
        """Run one tool call. Failures go back to the model as text; only cancellation escapes."""
        tool = self.tools.get(call.name)
        span = Span("tool", call.name, parent)
        span_started(span, {"arguments": call.arguments})
        if tool is None:
            error = f"Error: there is no tool named {call.name!r}; tools: {', '.join(self.tools)}"
            span_finished(span, "failed", LookupError(error))
            return error

        async def invoke() -> str:
            token = current_span.set(span)
            try:
                value = await tool.invoke(call.arguments)
            except Exception as exc:
                raise _ToolFailed(exc) from exc
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this call is being cancelled
                # Not this call's cancellation: something the tool awaited was cancelled by
                # someone else. The tool failed; its call goes on.
                raise _ToolFailed(exc) from exc
            finally:
                current_span.reset(token)
            return value if isinstance(value, str) else _to_json(value)

        text: str
        try:
            text, replayed = await journaled(
                current_durable_run.get(),
                span,
                "tool",
                _call_inputs(call.arguments),
                invoke,
                dump=json.dumps,
                load=lambda output: str(json.loads(output)) if output else "",
            )
        except _ToolFailed as failed:
            # Given back to the model, which may try another way; not journaled, so that a
            # resumed run calls the tool again.
            span_finished(span, "failed", failed.error)
            return f"Error: {type(failed.error).__name__}: {str_of(failed.error)}"
        except BaseException as exc:
            span_finished(span, status_of(exc), exc)
            raise
        attributes = {"output": text, "replayed": True} if replayed else {"output": text}
        span_finished(span, "completed", attributes=attributes)
        return text

    @staticmethod
    def _tool_messages(
        text: str, calls: list[ToolCall], results: list[str], prompted: bool
    ) -> list[Message]:
        if prompted:
            return _prompted.messages(text, calls, results)
        assistant: Message = {
            "role": "assistant",
            # Text, never null: servers such as llama.cpp's reject a null content.
            "content": text,
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ],
        }
        return [
            assistant,
            *(
                {"role": "tool", "tool_call_id": c.id, "content": r}
                for c, r in zip(calls, results, strict=True)
            ),
        ]

    def __repr__(self) -> str:
        return f"<Agent {self.name}>"

    def stream(self, *args: P.args, **kwargs: P.kwargs) -> AgentStream[R]:
        """Call the agent and iterate over its answer as the model generates it.

        A ``str`` agent yields the text deltas; a typed agent yields partial values as its JSON
        arrives (each validated, each different from the one before), the last item being the
        validated result. Use it as ``async for item in agent.stream(...)``, or as
        ``async with agent.stream(...) as stream:`` to close it at the end of the block: closing
        it, or cancelling the task reading it, stops the provider's generation.

        Retries, and fallback models, apply until the first item; a failure after that raises
        :class:`~kagura.errors.StreamBrokenError`. The per-attempt ``timeout`` bounds each
        wait for the next chunk (the first included); ``total_timeout`` the whole stream. The
        answer is never re-asked: one that does not validate, or that ``max_tokens`` cut off,
        raises :class:`~kagura.errors.OutputParseError`. Tools run between model rounds on
        models with native tool calling; an agent with tools on a model without it (the
        embedded one) is refused here with :class:`~kagura.errors.UsageError`. In a durable
        run the result is journaled before the stream ends, and a resumed run yields it as one
        item.
        """
        return open_agent_stream(self, self._bind(args, kwargs))


def _call_inputs(arguments: str) -> Any:
    """A tool call's arguments as the journal hashes them: the value the model's JSON text
    stands for (hashed with its keys sorted), so that the same call written again with its keys
    in another order is found journaled, not run twice. Text that is no JSON, or JSON nested
    past pydantic's limit (where json.loads would raise RecursionError, and hashing it would
    too), is hashed as the text it is: the tool itself refuses it, back to the model. A string
    with half a character in it (a lone surrogate) is read as json.loads reads it, as the tool
    does: hashed as it was before pydantic read the arguments."""
    try:
        return read_json(arguments)
    except ValueError:
        return arguments


class _ToolFailed(Exception):
    """A tool raised ``error``: told apart from a failure to journal its result, which ends
    the call."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def _to_json(value: Any) -> str:
    """A tool's result as the text the model reads: JSON, or, for a value that has none (bytes
    that are not UTF-8, a dict that holds itself), its repr. The tool has run by now: failing
    the call here would lose what it did."""
    try:
        return pydantic_core.to_json(value, fallback=repr).decode()
    except Exception:
        return repr_of(value)


def _return_type(fn: Callable[..., Any], name: str) -> Any:
    """The return annotation of the agent ``name``'s function, resolved (``str`` if none).

    Only the return type: the parameters' annotations are for the caller's type checker, and
    may name a type imported only under ``if TYPE_CHECKING:``, which ``get_type_hints(fn)``
    would fail to resolve. So the return annotation alone is handed to ``get_type_hints``, on
    a stand-in that holds it and is resolved in the function's globals as the function is."""
    annotations = getattr(fn, "__annotations__", None) or {}
    if "return" not in annotations:
        return str
    returned = annotations["return"]
    # get_type_hints looks a function's globals up on the innermost __wrapped__.
    stand_in = types.SimpleNamespace(__annotations__={"return": returned})
    return resolved_hints(
        stand_in,
        "agent",
        name,
        globalns=inspect.unwrap(fn).__globals__,
        one=f"its return annotation {returned!r}",
    )["return"]


def _fallback_models(fallback: object) -> tuple[str | Model, ...]:
    """The fallback models given to ``@agent(fallback=...)``: one model, or a list of them."""
    if isinstance(fallback, str | Model):
        fallback = (fallback,)
    if not isinstance(fallback, Iterable):
        raise UsageError(
            f"fallback must be a model, or a list of models, to try in turn, got {fallback!r}"
        )
    return tuple(
        _checked_model(
            spec,
            "fallback models are model strings such as 'openai/gpt-4o-mini', or "
            "kagura.providers.Model objects",
        )
        for spec in fallback
    )


def _checked_model(spec: object, takes: str) -> str | Model:
    """``spec`` if it is a model: a model string that parses (checked now, not at the first
    call), or a :class:`~kagura.providers.Model`; else a usage error, ``takes`` saying what
    was wanted."""
    if isinstance(spec, str):
        _parse_model_string(spec, None, None)
    elif not isinstance(spec, Model):
        raise UsageError(f"{takes}, got {spec!r}")
    return spec


def _agent_from(fn: AgentFunction[Any, Any], options: AgentOptions) -> Agent[Any, Any]:
    return Agent(fn, **options)


@overload
def agent(fn: AgentFunction[P, R], /) -> Agent[P, R]: ...
@overload
def agent(**options: Unpack[AgentOptions]) -> Callable[[AgentFunction[P, R]], Agent[P, R]]: ...
def agent(
    fn: AgentFunction[P, R] | None = None, /, **options: Any
) -> Agent[P, R] | Callable[[AgentFunction[P, R]], Agent[P, R]]:
    """Turn an async function into an LLM agent.

    The docstring is a Jinja2 template rendered over the call's arguments; the return annotation
    decides the result's type (``str`` by default). The body is never executed. Keywords that
    Kagura does not know (``top_p``, ``seed``, ...) are passed through to the provider.

    Usable bare (``@agent``) or with arguments (``@agent(model="gpt-4o-mini", temperature=0)``);
    the arguments are those of :class:`AgentOptions`. Provider keywords given bare are accepted
    too, but type checkers know only ``provider_kwargs=``: a ``TypedDict`` cannot yet say "and
    any other keyword" to mypy (PEP 728).
    """

    known: AgentOptions = {}
    extra: dict[str, Any] = {}
    for key, value in options.items():
        if key in AgentOptions.__optional_keys__:
            known[key] = value  # type: ignore[literal-required]  # a key of AgentOptions
        else:
            extra[key] = value
    if extra:
        known["provider_kwargs"] = {**(known.get("provider_kwargs") or {}), **extra}

    def decorate(f: AgentFunction[P, R]) -> Agent[P, R]:
        return Agent(f, **known)

    if fn is not None:
        return decorate(fn)
    return decorate
