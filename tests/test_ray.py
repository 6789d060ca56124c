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


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": "2"}, "workers must be a whole number, got '2'"),
        ({"workers": 0}, "workers must be at least 1, got 0"),
        ({"worker_concurrency": 2.5}, "worker_concurrency must be a whole number, got 2.5"),
        ({"model_actors": True}, "model_actors must be a whole number, got True"),
        ({"model_cpus": None}, "model_cpus must be a number, got None"),
        ({"model_cpus": 0}, "model_cpus must be a positive number of CPUs, got 0"),
        ({"model_cpus": float("inf")}, "model_cpus must be a positive number of CPUs, got inf"),
        ({"model_gpus": "1"}, "model_gpus must be a number, got '1'"),
        ({"model_gpus": -1}, "model_gpus must be a number of GPUs, 0 or more, got -1"),
    ],
)
def test_configure_refuses_settings_of_the_wrong_kind_naming_them(
    settings: dict[str, object], message: str
) -> None:
    # A bare TypeError from a comparison ('<' not supported between 'str' and 'int').
    pytest.importorskip("ray")
    import kagura.ray
    from kagura.errors import UsageError

    with pytest.raises(UsageError) as refused:
        kagura.ray.configure(**settings)  # type: ignore[arg-type]
    assert str(refused.value) == message


async def _double(value: int) -> int:
    return value * 2


def _sync_double(value: int) -> int:
    return value * 2


@pytest.mark.parametrize(
    ("fn", "items", "options", "message"),
    [
        (_double, ["x"], {"concurrency": "4"}, "concurrency must be a whole number, got '4'"),
        (_double, ["x"], {"concurrency": 0}, "concurrency must be at least 1, got 0"),
        (
            _double,
            5,
            {},
            "kagura.ray.map takes its items as an iterable (a list, a generator), got 5 (int)",
        ),
        (_sync_double, [1], {}, "which is not async: define it with `async def`"),
        (42, [1], {}, "needs an agent, a workflow or an async function (async def), got 42"),
    ],
)
async def test_map_refuses_what_it_cannot_run_before_anything_is_sent(
    fn: object,
    items: object,
    options: dict[str, object],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bare TypeError ("'int' object is not iterable"), or a function that is not async sent
    # to the workers, failing every item there.
    pytest.importorskip("ray")
    import kagura.ray
    from kagura.errors import UsageError
    from kagura.ray import _cluster

    def joined() -> None:
        # Ray is started only in a private network namespace (see the module's docstring).
        raise AssertionError("kagura.ray.map joined the cluster instead of refusing the call")

    monkeypatch.setattr(_cluster, "pool", joined)

    with pytest.raises(UsageError) as refused:
        await kagura.ray.map(fn, items, progress=False, **options)  # type: ignore[arg-type]
    assert message in str(refused.value)
