"""Kagura on a Ray cluster: durable runs and batches across machines (the ``[ray]`` extra).

- :func:`submit` runs a workflow as a durable run on a worker of the cluster and returns a
  :class:`RunHandle`: ``await handle`` gives the result, ``handle.run_id`` names the run,
  ``handle.cancel()`` stops it. When the worker's process dies (or its node), Ray starts the
  worker again and the run resumes from its journal: finished steps are not sent again.
- :func:`map` runs an agent, a workflow or an async function over many items across the
  workers: results in input order, each item's error kept apart, a progress bar in a terminal,
  and a retry budget and a cost budget that hold for the whole batch.
- A :class:`~kagura.resilience.RateLimiter`, :class:`~kagura.resilience.CircuitBreaker`,
  :class:`~kagura.resilience.RetryBudget` or :class:`~kagura.resilience.CostBudget` that a task
  takes along is one object for the whole cluster: its state lives in a Ray actor.
- ``local/...`` agents run on a pool of model actors (the model loaded once per actor).
- Every worker records to the same store (``KAGURA_DB``, or ``KAGURA_HOME/events.db`` when every
  node is on one host), one tree per run.

Ray is joined with ``ray.init()`` on first use (``RAY_ADDRESS`` names a cluster), unless the
program called ``ray.init`` itself; see docs/ray.md for a cluster of several machines.
"""

from __future__ import annotations

from ._cluster import configure as _configure
from ._cluster import shutdown
from ._config import ClusterConfig
from ._map import map
from ._submit import RunHandle, submit

__all__ = ["ClusterConfig", "RunHandle", "configure", "map", "shutdown", "submit"]


def configure(
    *,
    workers: int | None = None,
    worker_concurrency: int = 1000,
    model_actors: int | None = None,
    model_cpus: float = 1.0,
    model_gpus: float = 0.0,
) -> None:
    """How kagura.ray uses the cluster, before the first :func:`submit` or :func:`map` (calling
    it again later stops the workers and starts them anew with the new settings; refused, with
    a :class:`~kagura.errors.UsageError`, while submitted runs or batches are in flight).

    workers: worker actors, each one process running many runs at once (default: one per CPU
        of the cluster). They take no CPU from Ray's accounting: they wait for models.
    worker_concurrency: runs and items one worker runs at once.
    model_actors: actors of the embedded model for ``local/...`` agents (default: as many as
        the cluster's CPUs hold at ``model_cpus`` each); each loads the model once.
    model_cpus / model_gpus: Ray resources of each model actor (its llama.cpp threads follow
        ``model_cpus``).
    """
    import math

    from .._checks import count, real
    from ..errors import UsageError

    # Checked here, naming the setting: Ray takes them much later, from within a worker's start.
    if workers is not None:
        count(workers, "workers", at_least=1)
    count(worker_concurrency, "worker_concurrency", at_least=1)
    if model_actors is not None:
        count(model_actors, "model_actors", at_least=1)
    if not 0 < real(model_cpus, "model_cpus") < math.inf:
        raise UsageError(f"model_cpus must be a positive number of CPUs, got {model_cpus!r}")
    if not 0 <= real(model_gpus, "model_gpus") < math.inf:
        raise UsageError(f"model_gpus must be a number of GPUs, 0 or more, got {model_gpus!r}")
    _configure(
        ClusterConfig(
            workers=workers,
            worker_concurrency=worker_concurrency,
            model_actors=model_actors,
            model_cpus=model_cpus,
            model_gpus=model_gpus,
        )
    )
