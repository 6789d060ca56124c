"""JSON schemas that llama.cpp's grammar converter turns into a grammar safely.

llama-cpp-python (its embedded API and its OpenAI-compatible server alike) turns a
``response_format`` schema into a GBNF grammar with ``llama_grammar.json_schema_to_gbnf`` and hands
that to llama.cpp's C parser. Where the converter fails in Python, it falls back to plain JSON and
the whole schema is lost. Where it writes a grammar the C parser refuses (a regex ``\\d`` or ``\\.``
copied as it is, a ``_`` of a definition's name in a rule name, optional repetitions nested over
1000 deep), llama.cpp returns a NULL sampler, llama-cpp-python adds it to its sampler chain, and the
process dies of a segmentation fault.

:func:`grammar_schema` rewrites a schema into the part of JSON schema that the converter handles:
what a grammar can say is translated, the rest is left out. The grammar may come out looser than the
schema, never stricter: pydantic validates every answer afterwards (and a failed one is asked
again), while a grammar stricter than that validation would leave the model no valid answer.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, TypeGuard

__all__ = ["MAX_REPEAT", "grammar_pattern", "grammar_schema"]

#: The converter reads ``{}`` as "an object", so "any value" has to be spelled out.
_ANY: dict[str, Any] = {"type": ["object", "array", "string", "number", "boolean", "null"]}
_TYPES = frozenset(_ANY["type"]) | {"integer"}

#: Bounds become nested optional rules, and llama.cpp refuses nesting over 1000 deep (its
#: recursive parser overflows the stack before 100,000). Larger minimums are lowered to this,
#: larger maximums left out.
MAX_REPEAT = 1000

# The converter's own date-time and time rules demand a time zone, which naive types refuse.
_TIME = "[0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?"
_FORMAT_PATTERNS = {
    "date-time": f"^[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}T{_TIME}$",
    "time": f"^{_TIME}$",
}
#: Formats the converter has a correct rule for; it ignores the others.
_KEPT_FORMAT = re.compile(r"date|uuid[1-5]?")


def grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` that llama-cpp-python's converter turns into a grammar llama.cpp takes.

    Kept: types, properties and ``required``, ``additionalProperties``, items and tuples, unions,
    ``const`` and ``enum``, ``$ref`` and ``$defs``, string and array length bounds up to
    :data:`MAX_REPEAT`, the ``date`` and ``uuid`` formats. Translated: regex patterns (see
    :func:`grammar_pattern`), ``date-time`` and ``time`` (to patterns), a one-schema ``allOf``,
    an empty schema (to "any value"). Left out: everything else, e.g. numeric bounds, untranslatable
    patterns and other formats. ``schema`` itself is not modified.
    """
    if not isinstance(schema, dict):
        return dict(_ANY)
    refs = _definition_names(schema)
    definitions: dict[str, Any] = {}
    for container in ("$defs", "definitions"):
        found = schema.get(container)
        if isinstance(found, dict):
            for name, definition in found.items():
                definitions[refs[_pointer(container, name)]] = _node(definition, refs)
    root = _node(schema, refs)
    # When the root is a $ref, the converter resolves it without looking inside $defs, so the
    # references there are never resolved: the definition itself goes at the root.
    if "$ref" in root:
        root = dict(definitions[root["$ref"].removeprefix("#/$defs/")])
    if definitions:
        root["$defs"] = definitions
    return root


def _pointer(container: str, name: Any) -> str:
    return f"#/{container}/" + str(name).replace("~", "~0").replace("/", "~1")


def _definition_names(schema: dict[str, Any]) -> dict[str, str]:
    """New names of the definitions, by their old ``$ref``.

    The converter names a definition's rule after it and writes a recursive reference's name into
    the grammar as it is, but a rule name may hold only letters, digits and ``-``: a model named
    ``Tree_Node`` or a generic ``Tree[int]`` (``Tree_int_``) that refers to itself would crash.
    """
    names: dict[str, str] = {}
    for container in ("$defs", "definitions"):
        found = schema.get(container)
        if isinstance(found, dict):
            for name in found:
                readable = re.sub(r"[^A-Za-z0-9]+", "-", str(name)).strip("-")
                names[_pointer(container, name)] = f"def{len(names)}-{readable}"
    return names


def _node(schema: Any, refs: dict[str, str]) -> dict[str, Any]:
    """One (sub)schema, its keywords looked at in the order the converter looks at them."""
    if not isinstance(schema, dict):
        return dict(_ANY)  # a boolean schema
    if "$ref" in schema:
        ref = schema["$ref"]
        name = refs.get(ref) if isinstance(ref, str) else None
        return {"$ref": f"#/$defs/{name}"} if name else dict(_ANY)
    for key in ("oneOf", "anyOf"):
        alternatives = schema.get(key)
        if isinstance(alternatives, list) and alternatives:
            return {key: [_node(alternative, refs) for alternative in alternatives]}
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1:
        # The converter reads allOf as a merge of objects' properties, whatever the parts are.
        return _node(all_of[0], refs)
    if "const" in schema and _spellable(schema["const"]):
        return {"const": copy.deepcopy(schema["const"])}
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(_spellable(value) for value in enum):
        return {"enum": copy.deepcopy(enum)}

    kind = schema.get("type")
    if isinstance(kind, list):
        # The converter reads each type of a list alone, without the other keywords.
        kinds = [k for k in kind if isinstance(k, str) and k in _TYPES]
        return {"type": kinds} if kinds else dict(_ANY)
    if kind is not None and not (isinstance(kind, str) and kind in _TYPES):
        return dict(_ANY)
    out: dict[str, Any] = {} if kind is None else {"type": kind}
    if kind in (None, "object"):
        properties = _object(schema, refs)
        if properties is None:
            return {"type": "object"}
        out.update(properties)
    if kind in (None, "array"):
        out.update(_array(schema, refs))
    if kind in (None, "string"):
        out.update(_string(schema, kind))
    return out or dict(_ANY)


def _object(schema: dict[str, Any], refs: dict[str, str]) -> dict[str, Any] | None:
    """The object keywords, or None if a property's name cannot be written into the grammar."""
    out: dict[str, Any] = {}
    properties = schema.get("properties")
    if isinstance(properties, dict):
        if not all(isinstance(name, str) and _spellable(name) for name in properties):
            return None
        out["properties"] = {name: _node(sub, refs) for name, sub in properties.items()}
        required = schema.get("required")
        if isinstance(required, list):
            out["required"] = [n for n in required if isinstance(n, str) and n in properties]
    extra = schema.get("additionalProperties")
    if isinstance(extra, bool):
        out["additionalProperties"] = extra
    elif isinstance(extra, dict):
        out["additionalProperties"] = _node(extra, refs)
    return out


def _array(schema: dict[str, Any], refs: dict[str, str]) -> dict[str, Any]:
    items, prefix = schema.get("items"), schema.get("prefixItems")
    if isinstance(prefix, list) and items is None:  # a tuple
        return {"prefixItems": [_node(sub, refs) for sub in prefix]}
    if isinstance(items, dict) and prefix is None:
        return {"items": _node(items, refs), **_bounds(schema, "minItems", "maxItems")}
    # Both (the converter would read the items schema alone, for every position) or neither.
    return {}


def _string(schema: dict[str, Any], kind: str | None) -> dict[str, Any]:
    # The converter reads a pattern before anything else about a string, a format second.
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        translated = grammar_pattern(pattern)
        if translated is not None:
            return {"pattern": translated}
    form = schema.get("format")
    if isinstance(form, str):
        if form in _FORMAT_PATTERNS:
            return {"pattern": _FORMAT_PATTERNS[form]}
        if _KEPT_FORMAT.fullmatch(form):
            return {"format": form}
    if kind == "string":  # the converter reads lengths only when the type is said
        return _bounds(schema, "minLength", "maxLength")
    return {}


def _bounds(schema: dict[str, Any], low_key: str, high_key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    low, high = schema.get(low_key), schema.get(high_key)
    if _is_count(low) and low > 0:
        out[low_key] = min(low, MAX_REPEAT)
    if _is_count(high) and out.get(low_key, 0) <= high <= MAX_REPEAT:
        out[high_key] = high
    return out


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _spellable(value: Any) -> bool:
    """Whether the converter writes ``value`` as JSON into a grammar literal correctly.

    It escapes quotes for the grammar but not the backslash of a JSON escape (a ``"`` inside a
    string makes a grammar llama.cpp refuses), and writes a character outside the BMP as a
    surrogate pair, which no UTF-8 text matches.
    """
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return False
    return "\\" not in text and all(ord(c) <= 0xFFFF for c in text)


class _Unsupported(Exception):
    pass


# A regex class escape, as the inside of an explicit (ASCII) class.
_CLASS_ESCAPES = {"d": "0-9", "w": "0-9A-Za-z_", "s": r"\x20\x09\x0A\x0D\x0C\x0B"}
_QUANTIFIER = re.compile(r"\{([0-9]*)(,?)([0-9]*)\}")


def grammar_pattern(pattern: str) -> str | None:
    """``pattern`` in the regex dialect the converter turns into a correct grammar, or None.

    The converter copies a pattern into the grammar nearly character for character, and a grammar
    knows no ``\\d``, ``\\w``, ``\\s`` or escaped punctuation: these become explicit character
    classes. It takes only a pattern anchored at both ends (JSON schema patterns are not anchored
    otherwise), groups without ``?`` (``(?:`` becomes ``(``), and mis-reads an alternation at the
    top level (it is wrapped in a group). Lazy quantifiers match the same whole strings as greedy
    ones. What else a pattern holds (lookarounds, backreferences, word boundaries, flags, ``\\p``,
    and characters that a JSON string must escape) cannot be said, and None is returned.
    """
    try:
        return _translate(pattern)
    except _Unsupported:
        return None


def _translate(pattern: str) -> str:
    if not (pattern.startswith("^") and pattern.endswith("$")) or len(pattern) < 2:
        raise _Unsupported
    end = len(pattern) - 1  # the final $
    out: list[str] = []
    i, depth = 1, 0
    top_alternation = False
    can_repeat = False  # the last thing is one a quantifier may follow
    while i < end:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= end:  # an escaped $: no end anchor
                raise _Unsupported
            out.append(_escape(pattern[i + 1]))
            i += 2
            can_repeat = True
        elif c == "[":
            text, i = _char_class(pattern, i + 1, end)
            out.append(text)
            can_repeat = True
        elif c == "(":
            if pattern.startswith("(?:", i):
                i += 3
            elif pattern.startswith("(?", i):
                raise _Unsupported
            else:
                i += 1
            out.append("(")
            depth += 1
            can_repeat = False
        elif c == ")":
            if depth == 0 or out[-1] == "(":
                raise _Unsupported
            out.append(")")
            depth -= 1
            i += 1
            can_repeat = True
        elif c == "|":
            top_alternation = top_alternation or depth == 0
            out.append("|")
            i += 1
            can_repeat = False
        elif c in "*+?{":
            if not can_repeat:
                raise _Unsupported
            if c == "{":
                text, i = _quantifier(pattern, i)
            else:
                text, i = c, i + 1
            if pattern.startswith("?", i) and i < end:
                i += 1  # lazy
            elif pattern.startswith("+", i) and i < end:
                raise _Unsupported  # possessive
            out.append(text)
            can_repeat = False
        elif c == ".":
            out.append(".")
            i += 1
            can_repeat = True
        elif c in "^$]}" or _needs_json_escape(c):
            raise _Unsupported
        else:
            out.append(c)
            i += 1
            can_repeat = True
    if depth:
        raise _Unsupported
    body = "".join(out)
    return f"^({body})$" if top_alternation else f"^{body}$"


def _escape(c: str) -> str:
    """An escape outside brackets, as a class or a literal character."""
    if c in _CLASS_ESCAPES:
        return f"[{_CLASS_ESCAPES[c]}]"
    if c.lower() in _CLASS_ESCAPES:
        return f"[^{_CLASS_ESCAPES[c.lower()]}]"
    return f"[{_class_char(_escaped_char(c))}]"


def _escaped_char(c: str) -> str:
    """The character an escape of punctuation stands for; other escapes are not supported."""
    if not c.isascii() or c.isalnum() or not c.isprintable() or _needs_json_escape(c):
        raise _Unsupported  # \b \A \1 \p \t ..., or \\ and \" (JSON escapes)
    return c


def _needs_json_escape(c: str) -> bool:
    # The converter would put the bare character in the JSON string, which is invalid there.
    return c in '"\\' or ord(c) < 0x20


def _class_char(c: str) -> str:
    """A character inside a class, escaped the same way for regexes and for llama.cpp grammars."""
    if c.isascii() and c.isalnum():
        return c
    code = ord(c)
    if code <= 0xFF:
        return f"\\x{code:02X}"
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _char_class(pattern: str, i: int, end: int) -> tuple[str, int]:
    """The class whose contents start at ``i``, and the index after its ``]``."""
    negated = pattern.startswith("^", i)
    if negated:
        i += 1
    members: list[str] = []
    negated_escapes: list[str] = []  # \D \W \S
    start = i
    while True:
        if i >= end:
            raise _Unsupported
        c = pattern[i]
        if c == "]" and i > start:  # a ] first is a member
            i += 1
            break
        if c == "[" or pattern[i : i + 2] in ("&&", "--", "~~"):
            raise _Unsupported  # nested classes and set operations
        if c == "\\":
            if i + 1 >= end:
                raise _Unsupported
            e = pattern[i + 1]
            i += 2
            if e in _CLASS_ESCAPES:
                members.append(_CLASS_ESCAPES[e])
            elif e.lower() in _CLASS_ESCAPES:
                negated_escapes.append(_CLASS_ESCAPES[e.lower()])
            else:
                members.append(_class_char(_escaped_char(e)))
            continue
        if _needs_json_escape(c):
            raise _Unsupported
        i += 1
        if pattern.startswith("-", i) and i + 1 < end and pattern[i + 1] != "]":
            upper = pattern[i + 1]
            if upper in "\\[" or upper < c:
                raise _Unsupported
            members.append(f"{_class_char(c)}-{_class_char(upper)}")
            i += 2
        else:
            members.append(_class_char(c))
    if not negated_escapes:
        return f"[{'^' if negated else ''}{''.join(members)}]", i
    if negated:
        raise _Unsupported  # [^\D]: an intersection
    # [\Dx] is "not a digit, or x": an alternation of classes.
    parts = [f"[^{e}]" for e in negated_escapes] + ([f"[{''.join(members)}]"] if members else [])
    return "(" + "|".join(parts) + ")", i


def _quantifier(pattern: str, i: int) -> tuple[str, int]:
    match = _QUANTIFIER.match(pattern, i)
    if match is None or not (match[1] or match[3]):
        raise _Unsupported
    low = int(match[1] or 0)
    high = (int(match[3]) if match[3] else None) if match[2] else low
    if high is not None and high < low:
        raise _Unsupported
    low = min(low, MAX_REPEAT)
    if high is not None and high > MAX_REPEAT:
        high = None
    if high == low:
        return f"{{{low}}}", match.end()
    return f"{{{low},{'' if high is None else high}}}", match.end()
