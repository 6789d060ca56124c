"""A cluster of two hosts: a second Ray node joins from a UTS namespace of its own, so that it
has another host name (the network namespace, and so 127.0.0.1, is still the tests' own).

On SQLite, kagura.ray refuses such a cluster with a clear error. On PostgreSQL, a run whose whole
node is lost resumes on the other host once its lease runs out, and sends no finished step again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import kagura.ray
from kagura import agent, workflow
from kagura.durable import journal_for
from kagura.errors import UsageError
from kagura.ray import _cluster
from kagura.testing.fault_server import FaultServer
from tests.observability import conftest as store_fixtures

postgres_server = store_fixtures.postgres_server

OTHER_HOST = "kagura-node-b"


def _alive_hosts() -> set[str]:
    return {node["NodeManagerHostname"] for node in ray.nodes() if node["Alive"]}


@pytest.fixture(scope="module")
def second_host(ray_cluster: None) -> Iterator[subprocess.Popen[bytes]]:
    """A Ray node with one CPU on host ``kagura-node-b``, for this module's tests (the last of
    which loses it), stopped (SIGKILL) at the end. One for the module: a node killed is seen
    dead by the cluster only after its health checks fail, and until then it would count."""
    kagura.ray.shutdown()
    ray_command = str(Path(sys.executable).with_name("ray"))
    address = ray.get_runtime_context().gcs_address
    node = subprocess.Popen(
        [
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {OTHER_HOST} && exec "{ray_command}" start --address={address} '
            "--num-cpus=1 --block --disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its raylet and workers are one process group, killed at once
    )
    try:
        while OTHER_HOST not in _alive_hosts():
            assert node.poll() is None, "the second Ray node did not start"
            _wait_a_little()
        # Alive in the node table is not yet schedulable: until the head's scheduler has the
        # new node's resources, a worker meant for it would go to the head instead. A task
        # placed there for certain waits for that.
        (node_id,) = [
            n["NodeID"]
            for n in ray.nodes()
            if n["Alive"] and n["NodeManagerHostname"] == OTHER_HOST
        ]
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        assert ray.get(_host.options(scheduling_strategy=strategy).remote()) == OTHER_HOST
        yield node
    finally:
        kagura.ray.shutdown()
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        # The next tests expect one host: wait until the cluster has seen the node go (its
        # health checks miss it for some seconds first), however this module's tests ended.
        for _ in range(600):  # two minutes at most
            if OTHER_HOST not in _alive_hosts():
                break
            _wait_a_little()


def _spread_workers() -> None:
    """Two workers, one on each host. The pool deals its workers over the nodes, but Ray's
    placement is a preference (a node still starting its worker processes is passed over), so
    the pool is made again until it holds the arrangement this test is about."""
    for _ in range(10):
        kagura.ray.shutdown()
        kagura.ray.configure(workers=2)
        workers = _cluster.pool().workers
        if {host for host, _ in ray.get([w.ready.remote() for w in workers])} == {
            socket.gethostname(),
            OTHER_HOST,
        }:
            return
    pytest.fail("Ray placed both workers on one host ten times over")


@ray.remote(num_cpus=0)
def _host() -> str:
    return socket.gethostname()


def _wait_a_little() -> None:
    # Polling the cluster's node table: a joining node sends no other signal to this process.
    import time

    time.sleep(0.2)


def test_sqlite_is_refused_when_the_cluster_spans_two_hosts(
    second_host: subprocess.Popen[bytes],
) -> None:
    @workflow
    async def anything(x: int) -> int:
        return x

    with pytest.raises(UsageError, match=r"SQLite .* 2 hosts .*KAGURA_DB=postgresql://"):
        kagura.ray.submit(anything, 1)


@pytest.mark.timeout(600)  # a node's loss is noticed by Ray's health checks, then the lease
async def test_a_run_on_a_lost_node_resumes_on_the_other_host(
    second_host: subprocess.Popen[bytes],
    postgres_server: store_fixtures.PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = f"kagura_ray_{os.getpid()}"
    postgres_server.admin(f"CREATE DATABASE {database}")
    monkeypatch.setenv("KAGURA_DB", postgres_server.url(database))
    # Another host's process cannot be known gone: its lease is how the other host knows.
    monkeypatch.setenv("KAGURA_LEASE_SECONDS", "4")
    _spread_workers()
    topics = [f"lost-{i}" for i in range(4)]
    try:
        # Every run's second step hangs until the node is lost. On the surviving host the hung
        # request is closed by the server after 20 s, and the agent's retry sends it again
        # (answered by then): there too the second step is sent twice, never the first.
        with FaultServer.run_in_thread(
            rules=[("Second step", "hang")], answer="done", hang_seconds=20
        ) as server:

            @agent(model="vllm/test", base_url=server.base_url, retry=False)
            async def draft(topic: str) -> str:
                """First step: draft a note on {{ topic }}"""

            @agent(model="vllm/test", base_url=server.base_url)
            async def polish(text: str) -> str:
                """Second step: polish {{ text }}"""

            @workflow
            async def note(topic: str) -> str:
                return await polish(f"{topic}: {await draft(topic)}")

            handles = [kagura.ray.submit(note, topic, run_id=uuid.uuid4().hex) for topic in topics]
            await asyncio.to_thread(
                server.wait_for, lambda s: _count(s, "Second step") == len(topics), 120
            )
            journal = journal_for()
            hosts = {
                handle.run_id: journal.get_run(handle.run_id).host  # type: ignore[union-attr]
                for handle in handles
            }
            assert set(hosts.values()) == {socket.gethostname(), OTHER_HOST}
            server.set_rules()
            os.killpg(second_host.pid, signal.SIGKILL)  # the whole node: raylet and workers
            assert await asyncio.gather(*handles) == ["done"] * len(topics)
            assert _count(server, "First step") == len(topics)  # journaled: none sent again
            lost = [run_id for run_id, host in hosts.items() if host == OTHER_HOST]
            assert _count(server, "Second step") == 2 * len(topics)
        for run_id in lost:
            record = journal.get_run(run_id)
            assert record is not None and record.status == "completed"
            assert record.host == socket.gethostname() and record.attempts == 2
    finally:
        kagura.ray.shutdown()
        from kagura import _storage

        _storage.forget(_storage.normalise_url(postgres_server.url(database)))
        postgres_server.admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _count(server: FaultServer, step: str) -> int:
    return sum(
        1
        for request in server.chat_requests
        if any(step in str(m.get("content")) for m in request.messages)
    )
