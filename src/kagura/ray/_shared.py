"""Cluster-wide resilience state (placeholder until the shared-state work lands)."""

from __future__ import annotations

from typing import Any


def install_in_driver() -> None:
    pass


def install_in_worker() -> None:
    pass


async def settle(objects: tuple[Any, ...]) -> None:
    pass
