"""Placeholder: replaced by the grammar branch."""

from typing import Any


def grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return schema
