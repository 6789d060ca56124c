"""What a worker takes from the driver: the cluster's settings, and the store to record to."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

from .._storage import default_url, normalise_url
from ..errors import UsageError

#: The Ray namespace of kagura's named actors (shared state, model actors).
NAMESPACE = "kagura"

# Settings a worker takes from the driver so that both record to one store the same way. Not
# KAGURA_ENCRYPTION_KEY, nor a KAGURA_DB that holds a password: whatever is handed to Ray is
# kept by its control store (GCS) and shown by its state API, so secrets must be in each node's
# own environment (see WorkerSettings.check).
_SHIPPED = (
    "KAGURA_HOME",
    "KAGURA_RECORD",
    "KAGURA_RECORD_CONTENT",
    "KAGURA_RECORD_PROCESS",
    "KAGURA_LEASE_SECONDS",
    "KAGURA_MODEL",
    "KAGURA_DURABLE",
)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How kagura.ray uses the cluster (see :func:`kagura.ray.configure`)."""

    workers: int | None = None
    worker_concurrency: int = 1000
    model_actors: int | None = None
    model_cpus: float = 1.0
    model_gpus: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs of the driver's settings: shipped environment, and the identity of
    the store and the encryption key, which it checks against its own."""

    environment: dict[str, str]
    store: str  # the store's URL, its password masked
    sqlite: bool
    driver_host: str
    key_fingerprint: str | None
    config: ClusterConfig

    def apply(self) -> None:
        """In the worker, before anything is recorded."""
        os.environ.update(self.environment)
        # A worker records from a thread of its own process: a writer process per worker would
        # double the processes of the cluster for what one thread keeps up with (a worker's
        # runs wait on models, and the writer's work per span is ~25 µs).
        os.environ.setdefault("KAGURA_RECORD_PROCESS", "0")

    def check(self) -> None:
        """Refuse to run where this worker would write elsewhere than the driver reads."""
        host = socket.gethostname()
        mine = _masked(default_url())
        if mine != self.store:
            raise UsageError(
                f"the kagura worker on {host} records to {mine}, the driver to {self.store}: set "
                "KAGURA_DB (a postgresql:// URL whose password is in it) in the environment of "
                "every node, as `KAGURA_DB=... ray start ...`"
            )
        if self.sqlite and host != self.driver_host:
            raise UsageError(sqlite_hosts_message({self.driver_host, host}))
        if _key_fingerprint() != self.key_fingerprint:
            raise UsageError(
                f"KAGURA_ENCRYPTION_KEY on {host} is not the driver's: every node must hold the "
                "same key in its environment (it is never sent through Ray)"
            )


def _masked(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def _has_password(url: str) -> bool:
    from sqlalchemy import make_url

    return make_url(normalise_url(url)).password is not None


def _key_fingerprint() -> str | None:
    # A digest of a random 32-byte key tells nothing of the key; it lets the worker see it holds
    # the driver's without the key travelling.
    key = os.environ.get("KAGURA_ENCRYPTION_KEY")
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


def sqlite_hosts_message(hosts: set[str]) -> str:
    return (
        f"the event store is SQLite ({default_url()}), which only processes of one host can "
        f"share, but this cluster has nodes on {len(hosts)} hosts ({', '.join(sorted(hosts))}): "
        "set KAGURA_DB=postgresql://... in the environment of the driver and of every node"
    )


def worker_settings(config: ClusterConfig) -> WorkerSettings:
    url = default_url()
    environment = {name: os.environ[name] for name in _SHIPPED if name in os.environ}
    if "KAGURA_DB" in os.environ and not _has_password(os.environ["KAGURA_DB"]):
        environment["KAGURA_DB"] = os.environ["KAGURA_DB"]
    return WorkerSettings(
        environment=environment,
        store=_masked(url),
        sqlite=url.startswith("sqlite"),
        driver_host=socket.gethostname(),
        key_fingerprint=_key_fingerprint(),
        config=config,
    )
