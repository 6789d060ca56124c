"""Tools offered through the prompt, for models and servers without native tool calling.

The model answers with ``{"tool": <name>, "arguments": {...}}`` to call a tool, or with
``{"answer": <the result>}``. Where the endpoint constrains output to a JSON schema (the embedded
model's grammar, llama.cpp's servers) the answer is held to :func:`schema`, which names each
tool with its own arguments, so even a small model produces calls that parse.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic_core

from ._output import OutputSpec, OutputValidationError, json_candidates
from .providers import Message, OutputSchema, ToolCall, ToolSpec


def schema(tools: list[ToolSpec], output: OutputSpec) -> OutputSchema:
    """A tool call (one shape per tool, with its arguments) or the final answer."""
    defs: dict[str, Any] = {}
    answer = _answer(output, defs)
    options: list[dict[str, Any]] = []
    for tool in tools:
        parameters = dict(tool.parameters)
        defs.update(parameters.pop("$defs", {}))
        options.append(
            {
                "type": "object",
                "properties": {"tool": {"enum": [tool.name]}, "arguments": parameters},
                "required": ["tool", "arguments"],
            }
        )
    options.append({"type": "object", "properties": {"answer": answer}, "required": ["answer"]})
    result: dict[str, Any] = {"anyOf": options}
    if defs:
        result["$defs"] = defs
    return OutputSchema("ToolCallOrAnswer", result)


def answer_schema(output: OutputSpec) -> OutputSchema:
    """The final answer alone: asked for once the model repeats a call it has the result of."""
    defs: dict[str, Any] = {}
    result: dict[str, Any] = {
        "type": "object",
        "properties": {"answer": _answer(output, defs)},
        "required": ["answer"],
    }
    if defs:
        result["$defs"] = defs
    return OutputSchema("Answer", result)


def _answer(output: OutputSpec, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of the answer's value; its definitions go into ``defs``."""
    if output.schema is None:
        return {"type": "string"}
    inner = dict(output.schema.schema)
    defs.update(inner.pop("$defs", {}))
    answer: dict[str, Any] = inner["properties"]["result"] if output.wrapped else inner
    return answer


def instructions(tools: list[ToolSpec]) -> str:
    """The text after the prompt. A worked call with the first tool's real name and arguments:
    small models copy a concrete example far more reliably than a ``<placeholder>`` one."""
    first = tools[0]
    example = json.dumps(
        {"tool": first.name, "arguments": {name: "..." for name in _required(first)}}
    )
    lines = [
        "",
        "",
        f"You have tools. To use one, answer with only a JSON object like {example}; you will "
        'get its result. Once you have what you need, answer with only {"answer": ...}.',
        "Tools:",
    ]
    for tool in tools:
        properties = tool.parameters.get("properties", {})
        signature = ", ".join(
            f"{name}: {spec.get('type', 'value')}" if isinstance(spec, dict) else name
            for name, spec in properties.items()
        )
        described = "; ".join(
            f"{name}: {spec['description']}"
            for name, spec in properties.items()
            if isinstance(spec, dict) and spec.get("description")
        )
        lines.append(
            f"- {tool.name}({signature}): {tool.description}"
            + (f" Arguments: {described}." if described else "")
        )
    return "\n".join(lines)


def read(text: str, round_no: int, output: OutputSpec) -> tuple[list[ToolCall], str]:
    """The tool call the answer makes, or the final answer's text for ``output`` to parse.

    Raises :class:`OutputValidationError` for an answer that starts as JSON but is not a call
    or an answer: returned as it is, that would be a fragment of the protocol posing as a result.
    A plain-text answer (the model ignored the protocol) is the answer.
    """
    for candidate in json_candidates(text):
        try:
            # strict=False: small models put raw newlines inside strings.
            data = json.loads(candidate, strict=False)
            if isinstance(data, dict) and isinstance(data.get("tool"), str):
                arguments = data.get("arguments") or {}
                return [ToolCall(f"call_{round_no}", data["tool"], _to_json(arguments))], text
            if isinstance(data, dict) and "answer" in data:
                answer = data["answer"]
                if output.is_text:
                    return [], answer if isinstance(answer, str) else _to_json(answer)
                return [], _to_json({"result": answer} if output.wrapped else answer)
        except (ValueError, RecursionError):
            # Not JSON, or nested deeper than json.loads recurses or pydantic writes back.
            continue
    if text.lstrip().startswith(("{", "[")):
        raise OutputValidationError(
            'the answer is not valid JSON: answer with only {"tool": ..., "arguments": {...}} '
            'or {"answer": ...}'
        )
    return [], text


def repeated(text: str, call: ToolCall, result: str) -> list[Message]:
    """The turns after the model asked again for a call it already has the result of: small
    models, told "continue", often call the same tool again and again."""
    return [
        {"role": "assistant", "content": text},
        {
            "role": "user",
            "content": f"You already called {call.name} with these arguments; it returned: "
            f'{result}\nAnswer now, with only {{"answer": ...}}.',
        },
    ]


def call_key(call: ToolCall) -> tuple[str, str]:
    """The same tool with the same arguments, whatever their order and spacing."""
    try:
        arguments = json.dumps(json.loads(call.arguments, strict=False), sort_keys=True)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json recurses
        arguments = call.arguments
    return call.name, arguments


def messages(text: str, calls: list[ToolCall], results: list[str]) -> list[Message]:
    """The model's call and the tools' results, as the next turns of the conversation."""
    shown = "\n".join(f"Result of {c.name}: {r}" for c, r in zip(calls, results, strict=True))
    return [
        {"role": "assistant", "content": text},
        {"role": "user", "content": shown + "\nNow continue."},
    ]


def _required(tool: ToolSpec) -> list[str]:
    required = tool.parameters.get("required")
    if isinstance(required, list) and required:
        return [str(name) for name in required]
    return list(tool.parameters.get("properties", {}))


def _to_json(value: Any) -> str:
    return pydantic_core.to_json(value, fallback=repr).decode()
