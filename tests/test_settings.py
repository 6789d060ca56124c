"""Settings read from the environment: what each accepts, and what it says of the rest."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest

from kagura import _settings


@pytest.mark.parametrize(
    ("name", "read", "default"),
    [
        ("KAGURA_RECORD", _settings.recording_enabled, True),
        ("KAGURA_RECORD_PROCESS", _settings.record_in_a_process, True),
        ("KAGURA_DURABLE", _settings.durable_default, False),
    ],
)
def test_an_on_off_setting_reads_the_usual_words_and_says_what_else_it_was_given(
    monkeypatch: pytest.MonkeyPatch, name: str, read: Callable[[], bool], default: bool
) -> None:
    given = {"1": True, "yes": True, "ON": True, " true ": True, "0": False, "no": False}
    given |= {"Off": False, "false": False, "": default}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value, expected in given.items():
            monkeypatch.setenv(name, value)
            assert read() is expected, value
    monkeypatch.setenv(name, "maybe")
    said = f"{name}='maybe' is neither on (1, true, yes, on) nor off (0, false, no, off): read "
    said += f"as {'on' if default else 'off'}, the default"
    with pytest.warns(UserWarning, match=f"^{re.escape(said)}$"):
        assert read() is default
