"""A real local Ray cluster for the tests of kagura.ray (2 CPUs, no dashboard).

These tests run only inside a private network namespace whose only interface is loopback, where
Ray cannot bind to the machine's address: tests/test_ray.py starts them there, in a pytest of
their own (``KAGURA_RAY_TESTS=1``); tests/conftest.py leaves this folder out of any other run.
The cluster is started once for the session; each test gets the pool of workers it configures.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")

import kagura.ray  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    interfaces = {name for _, name in socket.if_nameindex()}
    assert interfaces == {"lo"}, (
        f"the kagura.ray tests start Ray, which binds to the machine's address: run them in a "
        f"private network namespace (tests/test_ray.py does), not beside {sorted(interfaces)}"
    )
    # address="local": a new cluster, never one a `ray start` on this machine left behind.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="kagura",
        log_to_driver=False,
    )
    yield
    kagura.ray.shutdown()
    ray.shutdown()


@pytest.fixture
def cluster(ray_cluster: None) -> Iterator[None]:
    """The cluster with two workers; stopped after the test, so that no test sees another's."""
    kagura.ray.configure(workers=2)
    yield
    kagura.ray.shutdown()
