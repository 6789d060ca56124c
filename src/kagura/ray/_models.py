"""The embedded model's actors (placeholder until the model-actor work lands)."""

from __future__ import annotations

from typing import Any


def install_in_worker(config: Any) -> None:
    pass


def stop_model_actors() -> None:
    pass
