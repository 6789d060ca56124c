"""The cluster kagura.ray runs on: Ray joined (or started), the store every worker records to,
and the pool of worker actors that runs workflows and batch items.

A worker is an async Ray actor: one process that runs many runs at once on its event loop (a
run mostly waits for a model), so a worker takes no CPU from Ray's accounting and the CPUs stay
for what computes (the embedded model's actors, :mod:`kagura.ray._models`). Workers are
restarted by Ray when their process dies, and Ray then retries the calls they had in flight:
that, with the durable journal, is the failover (see :mod:`kagura.ray._worker`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import UsageError
from ._config import NAMESPACE, ClusterConfig, sqlite_hosts_message, worker_settings
from ._worker import Worker


def ensure_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or the one ``ray.init`` was called for), else
    start a local one."""
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=True)


def _alive() -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return [node for node in nodes if node.get("Alive")]


def cluster_hosts() -> set[str]:
    return {node["NodeManagerHostname"] for node in _alive()}


def alive_nodes() -> list[str]:
    return [str(node["NodeID"]) for node in _alive()]


class Pool:
    """The driver's worker actors, each given work in turn."""

    def __init__(self, config: ClusterConfig) -> None:
        ensure_ray()
        from . import _shared

        # Before anything is sent to a worker: limiters, breakers and budgets travel as their
        # cluster-wide state actors from the first task on.
        _shared.install_in_driver()
        settings = worker_settings(config)
        if settings.sqlite:
            hosts = cluster_hosts()
            if len(hosts) > 1:
                raise UsageError(sqlite_hosts_message(hosts))
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        count = config.workers or max(1, int(cpus))
        actor: Any = ray.remote(Worker)
        options: dict[str, Any] = dict(
            num_cpus=0,
            max_concurrency=config.worker_concurrency,
            # A worker whose process dies is started again and its calls in flight are sent
            # again: a durable run resumes from its journal. (``map`` sends its items again
            # itself, counting how many times each lost its worker.)
            max_restarts=-1,
            max_task_retries=-1,
            namespace=NAMESPACE,
        )
        # Dealt over the nodes in turn: Ray's SPREAD is a preference that may put every worker
        # (they ask for no CPU) on one node. Soft, so that a worker of a lost node starts again
        # on another one.
        nodes = sorted(alive_nodes())
        self.config = config
        self.workers: list[ActorHandle[Worker]] = [
            actor.options(
                **options,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    nodes[index % len(nodes)], soft=True
                ),
            ).remote(settings)
            for index in range(count)
        ]
        # Raised here rather than at the first run: a worker that refused the store says why.
        ray.get([worker.ready.remote() for worker in self.workers])
        self._turn = itertools.cycle(self.workers)
        # What is in flight on the workers (a submitted run, a batch), by a key of its own:
        # stopping the workers under it is refused (see _refuse_if_busy).
        self._busy: dict[int, str] = {}
        self._busy_keys = itertools.count()
        self._busy_lock = threading.Lock()

    def next(self) -> ActorHandle[Worker]:
        return next(self._turn)

    def busy_with(self, what: str) -> Callable[..., None]:
        """Note ``what`` as in flight on the workers; the function returned (which takes and
        ignores any arguments, as a done-callback) notes it done."""
        key = next(self._busy_keys)
        with self._busy_lock:
            self._busy[key] = what

        def done(*_: Any) -> None:
            with self._busy_lock:
                self._busy.pop(key, None)

        return done

    def busy(self) -> list[str]:
        with self._busy_lock:
            return list(self._busy.values())


_config = ClusterConfig()
_pool: Pool | None = None
_lock = threading.Lock()


def configure(config: ClusterConfig) -> None:
    global _config, _pool
    with _lock:
        if _pool is not None and _pool.config != config:
            _refuse_if_busy(_pool, "configure() with other settings")
            _stop(_pool)
            _pool = None
        _config = config


def pool() -> Pool:
    with _lock:
        return _the_pool()


def _the_pool() -> Pool:
    """The pool, started if it is not (call it holding ``_lock``)."""
    global _pool
    if _pool is None:
        _pool = Pool(_config)
    return _pool


def busy_pool(what: str) -> tuple[Pool, Callable[..., None]]:
    """:func:`pool`, with ``what`` noted in flight on it in the same step (see
    :meth:`Pool.busy_with`): a configure() or shutdown() in between would stop the workers it
    is about to be sent to."""
    with _lock:
        found = _the_pool()
        return found, found.busy_with(what)


def shutdown() -> None:
    """Stop the workers and the model actors of this driver (not the Ray cluster); the next
    ``submit`` or ``map`` starts them again. Refused (:class:`~kagura.errors.UsageError`) while
    submitted runs or batches are in flight: await or cancel them first."""
    global _pool
    with _lock:
        if _pool is not None:
            _refuse_if_busy(_pool, "shutdown()")
            _stop(_pool)
            _pool = None


def _refuse_if_busy(pool: Pool, call: str) -> None:
    """Stopping the workers kills what runs on them: its callers would get Ray's
    ActorDiedError, and its durable runs stay interrupted until someone resumes them."""
    busy = pool.busy()
    if busy:
        shown = ", ".join(busy[:5]) + (f" and {len(busy) - 5} more" if len(busy) > 5 else "")
        raise UsageError(
            f"kagura.ray.{call} stops the workers, but these are in flight on them: {shown}; "
            "await their handles and batches (or cancel them) first"
        )


def _stop(pool: Pool) -> None:
    from ._models import stop_model_actors

    for worker in pool.workers:
        ray.kill(worker, no_restart=True)
    stop_model_actors()
