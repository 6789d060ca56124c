"""Project-wide settings read from the environment at call time (cheap, and tests can patch)."""

from __future__ import annotations

import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Literal

LOCAL_MODEL = "local/smollm2"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"


def default_model() -> str:
    """The model used by agents that name none.

    ``KAGURA_MODEL`` if set; else OpenAI's ``gpt-4o-mini`` when ``OPENAI_API_KEY`` is set; else the
    embedded local model, so that everything runs offline with no configuration at all. Blank is
    unset, as for every setting; surrounding spaces are not part of a model's name.
    """
    explicit = os.environ.get("KAGURA_MODEL", "").strip()
    if explicit:
        return explicit
    if os.environ.get("OPENAI_API_KEY"):
        return OPENAI_DEFAULT_MODEL
    return LOCAL_MODEL


def model_override() -> str | None:
    """``KAGURA_MODEL_OVERRIDE`` forces every agent onto one model, whatever it names (blank:
    unset)."""
    return os.environ.get("KAGURA_MODEL_OVERRIDE", "").strip() or None


def kagura_home() -> Path:
    """``KAGURA_HOME``, else ``~/.kagura``."""
    return _home(os.environ.get("KAGURA_HOME") or None, os.environ.get("HOME"))


@lru_cache(maxsize=16)
def _home(explicit: str | None, user_home: str | None) -> Path:
    # Cached per setting (``user_home`` is what Path.home() reads): every durable run looks its
    # journal up by this path, so it is made once per setting rather than once per run.
    return Path(explicit) if explicit else Path.home() / ".kagura"


def event_store_url() -> str | None:
    """``KAGURA_DB``: where recordings go (a SQLite path or a ``postgresql://`` URL)."""
    return os.environ.get("KAGURA_DB") or None


def _switch(name: str, default: bool) -> bool:
    """The on/off setting ``name`` (1, true, yes, on; 0, false, no, off; unset: ``default``).
    Anything else is said, and read as the default: a typo must not pass for a choice."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    warnings.warn(
        f"{name}={value!r} is neither on (1, true, yes, on) nor off (0, false, no, off): read as "
        f"{'on' if default else 'off'}, the default",
        UserWarning,
        stacklevel=3,
    )
    return default


def recording_enabled() -> bool:
    """``KAGURA_RECORD=0`` turns automatic recording off."""
    return _switch("KAGURA_RECORD", True)


def record_in_a_process() -> bool:
    """Does the recorder write through a process of its own? ``KAGURA_RECORD_PROCESS=0`` keeps
    the writer in a thread of the recording process. A frozen application (PyInstaller and the
    like) always does: its executable is the application itself, not an interpreter to start."""
    if not _switch("KAGURA_RECORD_PROCESS", True):
        return False
    return bool(sys.executable) and not getattr(sys, "frozen", False)


#: How recorded prompts and outputs are stored: whole, as hashes, or not at all.
ContentMode = Literal["full", "hash", "none"]
CONTENT_MODES: tuple[ContentMode, ...] = ("full", "hash", "none")


def record_content() -> ContentMode:
    """``KAGURA_RECORD_CONTENT``: ``full`` (default), ``hash`` or ``none`` (prompts, outputs)."""
    value = os.environ.get("KAGURA_RECORD_CONTENT", "full").lower()
    for mode in CONTENT_MODES:
        if value == mode:
            return mode
    # A privacy setting misspelt ("off", "hashed") is meant to keep something out: the safest
    # reading, said, rather than everything recorded in full.
    warnings.warn(
        f"KAGURA_RECORD_CONTENT={value!r} is none of full, hash or none: no prompts or outputs "
        f"are recorded (none) until it says which",
        UserWarning,
        stacklevel=2,
    )
    return "none"


def durable_default() -> bool:
    """``KAGURA_DURABLE=1`` makes every top-level workflow run durable unless it says otherwise."""
    return _switch("KAGURA_DURABLE", False)
