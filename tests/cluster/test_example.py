"""``examples/advanced_workflows/ray_workflow.py`` end to end, as a user runs it: a subprocess
that starts its own local Ray cluster (it inherits this private network namespace), on the fake
model, recording to a store of its own. Then once more on the same store: the durable run's id
is found completed, and its stored result comes back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "advanced_workflows" / "ray_workflow.py"


def run_example(home: Path) -> str:
    environment = {
        **os.environ,
        "KAGURA_HOME": str(home),
        "KAGURA_MODEL": "fake",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for name in ("RAY_ADDRESS", "KAGURA_DB", "KAGURA_MODEL_OVERRIDE", "KAGURA_DURABLE"):
        environment.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return done.stdout


@pytest.mark.timeout(660)
def test_the_ray_example_runs_a_batch_and_a_durable_run_once(tmp_path: Path) -> None:
    out = run_example(tmp_path)
    for title in ("1. The cluster", "2. A batch", "3. A durable run on a worker", "4. The same"):
        assert f"=== {title}" in out, out
    assert "Started a local Ray cluster (2 CPUs, no dashboard)" in out
    assert "Agents that name no model run on: fake/echo" in out
    # The fake model answers a Literal with its first label, and map keeps the input order.
    assert out.count("  billing   ") == 6, out
    assert "6 answered, 0 failed, in input order" in out
    assert "run id:   ray-example-brief" in out
    # "ran on:   HOST pid WORKER (a worker, not this process: pid DRIVER)"
    ran_on = next(line for line in out.splitlines() if line.startswith("  ran on:"))
    worker, driver = re.findall(r"pid (\d+)", ran_on)
    assert worker != driver, ran_on
    assert "journal: completed, 3 steps, attempt 1" in out
    assert "same result: True; ran again: False" in out
    assert "an earlier run of this script" not in out

    again = run_example(tmp_path)  # the same store: the run id is already completed
    assert "an earlier run of this script completed this run id" in again
    assert "same result: True; ran again: False" in again
    assert "journal: completed, 3 steps, attempt 1" in again
