"""The kagura.ray tests (tests/cluster/), on a local Ray cluster in a private network namespace.

Ray binds to the machine's network address, never to loopback; in a namespace whose only
interface is ``lo`` it takes 127.0.0.1, and nothing outside can reach it. A process cannot move
its own sockets into another namespace, so the Ray tests run in a pytest of their own there,
whose output is shown when it fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kagura.testing import in_private_network

ROOT = Path(__file__).resolve().parent.parent


def _missing() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed: pip install -e '.[ray]'"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare and ip (util-linux, iproute2) are needed for a private network namespace"
    return None


@pytest.mark.timeout(1200)
def test_kagura_ray_on_a_local_cluster() -> None:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"the Ray tests must run in CI, but {reason}", pytrace=False)
        pytest.skip(reason)
    command = in_private_network(
        [sys.executable, "-m", "pytest", "tests/cluster", "-p", "no:cacheprovider", "-q", "-rfEs"]
    )
    environment = {**os.environ, "KAGURA_RAY_TESTS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    environment.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1150
    )
    report = done.stdout[-20000:] + done.stderr[-5000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and "skipped" not in done.stdout, report


async def test_the_clusters_breaker_tells_its_probes_from_calls_admitted_before() -> None:
    # The state actor's own logic, run here: a worker's call admitted while the circuit was
    # closed that fails late (not a health signal) must not free the half-open probe's place.
    pytest.importorskip("ray")
    from kagura.ray._shared import SharedState

    state = SharedState(
        "circuit-breaker",
        {"name": "cluster", "failure_threshold": 1, "recovery_time": 0, "half_open_probes": 1},
    )
    late, _, _ = await state.admit()  # admitted while closed; it answers late
    failing, _, _ = await state.admit()
    await state.record(True, failing)  # opens; recovery_time 0: half-open at the next admit
    probe, _, _ = await state.admit()
    assert probe is not None and state.obj.state == "half_open"
    await state.record(False, late)  # the late call's failure, not counted
    refused, _, probing = await state.admit()
    assert refused is None and probing  # the probe still holds the only place
    await state.record(None, late)  # nor does a late success close the circuit
    assert state.obj.state == "half_open"
    await state.record(None, probe)
    assert state.obj.state == "closed"
