"""Shared fixtures. Keep this small: only what several test modules need."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_model_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their model explicitly; the developer's shell settings must not leak in.

    ``KAGURA_MODEL_OVERRIDE`` would beat even ``model=FakeModel(...)``, so it is always cleared.
    """
    monkeypatch.delenv("KAGURA_MODEL_OVERRIDE", raising=False)
    monkeypatch.delenv("KAGURA_MODEL", raising=False)
