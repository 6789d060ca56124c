"""Project-wide settings read from the environment at call time (cheap, and tests can patch)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "local/smollm2"


def default_model() -> str:
    """The model used by agents that name none: ``KAGURA_MODEL``, else the embedded model."""
    return os.environ.get("KAGURA_MODEL") or DEFAULT_MODEL


def model_override() -> str | None:
    """``KAGURA_MODEL_OVERRIDE`` forces every agent onto one model, whatever it names."""
    return os.environ.get("KAGURA_MODEL_OVERRIDE") or None


def kagura_home() -> Path:
    return Path(os.environ.get("KAGURA_HOME") or Path.home() / ".kagura")
