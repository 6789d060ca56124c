"""Dialect-specific statements: the one place that picks SQLite's or PostgreSQL's construct."""

from __future__ import annotations

from typing import Any


def insert(bind: Any, table: Any) -> Any:
    """An ``INSERT`` into ``table`` for the database behind ``bind`` (an engine or connection):
    the dialect's own, which (unlike the generic one) has ``ON CONFLICT`` for upserts."""
    if bind.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)
