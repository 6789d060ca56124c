"""``examples/advanced_workflows/streaming_workflow.py`` on the fake model: every section streams,
the typed one ends with the validated result, and the essay left early is a cancelled call."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kagura.testing import FakeModel, Reply, capture_events, override_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "advanced_workflows"
SCRIPT = EXAMPLES / "streaming_workflow.py"


def load() -> ModuleType:
    """Import the example script as a module (it is not a package), once."""
    name = "advanced_workflows_streaming_workflow"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the Postcard's annotations through it
    spec.loader.exec_module(module)
    return module


CARD = {"city": "Paris", "country": "France", "greeting": "Bonjour from the Seine!"}


async def test_streaming_main_runs_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    example = load()
    essay = " ".join(f"word{n}" for n in range(50))
    fake = FakeModel([Reply("Paris is the capital of France."), Reply(json.dumps(CARD)), essay])
    with override_model(fake), capture_events() as events:
        await example.main()
    out = capsys.readouterr().out
    for title in ("1. Text, delta by delta", "2. A typed result", "3. Leaving early"):
        assert title in out
    assert "Paris is the capital of France." in out
    assert "Paris, France: 'Bonjour from the Seine!'" in out  # the last value shown
    assert "word7\n(left after 8 words" in out and "word8" not in out
    assert f"postcard: {example.Postcard(**CARD)!r}" in out
    statuses = {s.name: s.status for s in events.spans(kind="agent")}
    assert statuses == {"describe": "completed", "postcard": "completed", "essay": "cancelled"}
