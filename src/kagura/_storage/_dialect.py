"""Dialect-specific statements: the one place that picks SQLite's or PostgreSQL's construct."""

from __future__ import annotations

from typing import Any


def insert(bind: Any, table: Any) -> Any:
    """An ``INSERT`` into ``table`` for the database behind ``bind`` (an engine, a connection
    or a dialect): the dialect's own, which (unlike the generic one) has ``ON CONFLICT`` for
    upserts."""
    if getattr(bind, "dialect", bind).name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def positional_sql(statement: Any, dialect: Any) -> tuple[str, tuple[str, ...]]:
    """``statement`` (SQLAlchemy Core) compiled for ``dialect`` with positional parameters: its
    SQL text and the names of its parameters in order. For ``executemany`` straight on the
    driver (``connection.exec_driver_sql``) with rows of plain tuples, where SQLAlchemy's own
    processing of each row's parameters would cost more than the insert itself."""
    if dialect.positional:
        compiled = statement.compile(dialect=dialect)
    else:  # psycopg's default style is named (%(name)s): compiled with its positional one
        compiled = statement.compile(dialect=type(dialect)(paramstyle="format"))
    return compiled.string, tuple(compiled.positiontup or ())
