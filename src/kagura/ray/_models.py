"""The embedded model on the cluster: a pool of model actors that ``local/...`` agents call.

In a worker, :func:`install_in_worker` claims the ``local`` prefix of model strings
(:func:`kagura.providers.register_provider`), so a ``local/<name>`` agent (and the default model
when it is the embedded one) gets a :class:`RemoteLocalModel`. Its requests go to the model
actors: each is one process holding one real :class:`~kagura.providers.local.LocalModel`,
loaded once, whose llama.cpp threads are the actor's ``num_cpus``. A batch on the embedded model
thus computes on every core the cluster gives the actors, while the workers only wait.

The actors are named (``kagura-model-<job id>-<n>``, namespace ``kagura``) and detached: every
worker of the job finds the same ones, and a worker that dies (SIGKILL) does not take them
with it, as it would the actors it owns. The first worker to need them makes them
(``get_if_exists``); the driver's :func:`stop_model_actors` kills them with the pool.

An actor sends back the exception its ``LocalModel`` raised as a value rather than letting Ray
wrap it, so the agent sees the very type the in-process model raises (retries and fallbacks
classify it the same); an actor that died or cannot be reached is a
:class:`~kagura.errors.ProviderConnectionError`, which is retried (Ray restarts the actor).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

import ray
from ray.actor import ActorHandle

from ..errors import ProviderConnectionError, ProviderError
from ..providers import Model, ModelRequest, ModelResponse, StreamChunk, register_provider
from ..providers.local import LocalModel
from ._config import NAMESPACE, ClusterConfig

_PREFIX = "kagura-model-"


def _names_prefix(job_id: str) -> str:
    return f"{_PREFIX}{job_id}-"


def _current_job() -> str:
    return ray.get_runtime_context().get_job_id()


def _portable(error: BaseException, model: str) -> BaseException:
    """``error`` if it comes through a pickle as itself, else a :class:`ProviderError` saying it.

    Pickling keeps an exception's type, arguments and attributes (not its ``__cause__``), but an
    exception whose constructor takes other arguments than it gives its base class cannot be
    made again on the other side."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:
        copy = None
    if type(copy) is type(error):
        return error
    return ProviderError(f"{type(error).__name__}: {error}", model=model)


class ModelActor:
    """One process of the pool: a :class:`LocalModel`, loaded once (an async Ray actor)."""

    def __init__(self, name: str, threads: int) -> None:
        # One llama.cpp instance per actor: the model is loaded once.
        os.environ["KAGURA_LOCAL_WORKERS"] = "1"
        # Ray gives this process `threads` of the node's cores: llama.cpp must not take more.
        os.environ["KAGURA_LOCAL_THREADS"] = str(threads)
        self.model = LocalModel(name)
        self.loads = 0
        self.served = 0
        self._loading = asyncio.Lock()

    async def prepare(self) -> BaseException | None:
        """Load the model unless it is loaded: ``None``, or the error a call would raise."""
        try:
            await self._prepare()
        except Exception as error:
            return _portable(error, self.model.id)
        return None

    async def _prepare(self) -> None:
        async with self._loading:
            if self.model.prepared:
                return
            await self.model.prepare()
            self.loads += 1

    async def request(self, request: ModelRequest) -> ModelResponse | BaseException:
        self.served += 1
        try:
            await self._prepare()
            return await self.model.request(request)
        except Exception as error:
            return _portable(error, self.model.id)

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk | BaseException]:
        self.served += 1
        try:
            await self._prepare()
            async for chunk in self.model.stream(request):
                yield chunk
        except Exception as error:
            yield _portable(error, self.model.id)

    def info(self) -> dict[str, Any]:
        """Where it runs and what it did: host, pid, loads of the model, requests served, and
        llama.cpp's threads (generating, evaluating a prompt)."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "loads": self.loads,
            "served": self.served,
            "threads": self.model.threads,
        }


class _Actors:
    """A worker's handles on the model actors, and its requests in flight on each."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._ready: Future[list[ActorHandle[ModelActor]]] | None = None
        self.handles: list[ActorHandle[ModelActor]] = []
        self.in_flight: list[int] = []
        self._turn = itertools.count()

    async def get(self, name: str) -> list[ActorHandle[ModelActor]]:
        """The actors, made (or found) and their model loaded: by the first caller, in a thread
        (Ray's named-actor calls block), the others waiting for it. A failure is raised to every
        waiter, and the next call tries again."""
        if self.handles:
            return self.handles
        with self._lock:
            future = self._ready
            if future is None:
                future = self._ready = Future()
                future.set_running_or_notify_cancel()
                threading.Thread(
                    target=self._start, args=(future, name), name="kagura-model-actors", daemon=True
                ).start()
        return await asyncio.wrap_future(future)

    def _start(self, future: Future[list[ActorHandle[ModelActor]]], name: str) -> None:
        try:
            handles = self._make(name)
            try:
                loading = [handle.prepare.remote() for handle in handles]
                failures: list[BaseException | None] = ray.get(loading)
            except ray.exceptions.RayError as error:
                raise unreachable(error, f"{LocalModel.provider}/{name}") from error
            for failure in failures:
                if failure is not None:
                    raise failure
        except BaseException as error:
            with self._lock:
                self._ready = None
            future.set_exception(error)
        else:
            with self._lock:
                self.in_flight = [0] * len(handles)
                self.handles = handles
            future.set_result(handles)

    def _make(self, name: str) -> list[ActorHandle[ModelActor]]:
        config = self.config
        count = config.model_actors
        if count is None:
            cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
            count = max(1, int(cpus // config.model_cpus))
        actor: Any = ray.remote(ModelActor)
        prefix = _names_prefix(_current_job())
        return [
            actor.options(
                name=f"{prefix}{index}",
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=config.model_cpus,
                num_gpus=config.model_gpus,
                max_restarts=-1,
                scheduling_strategy="SPREAD",
            ).remote(name, max(1, int(config.model_cpus)))
            for index in range(count)
        ]

    def take(self) -> int:
        """The actor with the fewest of this worker's requests in flight (taking turns between
        equals, so that calls one at a time spread as well)."""
        count = len(self.in_flight)
        start = next(self._turn) % count
        index = min(
            ((start + offset) % count for offset in range(count)),
            key=self.in_flight.__getitem__,
        )
        self.in_flight[index] += 1
        return index

    def give_back(self, index: int) -> None:
        self.in_flight[index] -= 1


class RemoteLocalModel(Model):
    """``local/<name>`` in a worker: the same model as :class:`LocalModel` (its id, its price,
    its abilities), answered by the model actors."""

    provider = LocalModel.provider
    supports_output_schema = LocalModel.supports_output_schema
    supports_tools = LocalModel.supports_tools
    supports_streaming = LocalModel.supports_streaming
    default_max_tokens = LocalModel.default_max_tokens

    def __init__(self, model_name: str, actors: _Actors) -> None:
        LocalModel(model_name)  # refuses a name the embedded model is not, as it would here
        self.model_name = model_name
        self.prepared = False
        self._actors = actors

    async def prepare(self) -> None:
        """Make (or find) the model actors and wait for their model to be loaded."""
        await self._actors.get(self.model_name)
        self.prepared = True

    async def request(self, request: ModelRequest) -> ModelResponse:
        actors = self._actors
        handles = await actors.get(self.model_name)
        index = actors.take()
        try:
            ref: Any = handles[index].request.remote(request)
            try:
                answer: ModelResponse | BaseException = await ref
            except asyncio.CancelledError:
                # Stops the generation at its next token, as a cancelled LocalModel call does.
                ray.cancel(ref)
                raise
            except ray.exceptions.RayError as error:
                raise unreachable(error, self.id) from error
        finally:
            actors.give_back(index)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        actors = self._actors
        handles = await actors.get(self.model_name)
        index = actors.take()
        chunks: Any = None
        finished = False
        try:
            chunks = handles[index].stream.remote(request)
            async for ref in chunks:
                try:
                    chunk: StreamChunk | BaseException = await ref
                except ray.exceptions.RayError as error:
                    raise unreachable(error, self.id) from error
                if isinstance(chunk, BaseException):
                    finished = True
                    raise chunk
                yield chunk
                if isinstance(chunk, ModelResponse):
                    finished = True
                    return
        except ray.exceptions.RayError as error:
            raise unreachable(error, self.id) from error
        finally:
            actors.give_back(index)
            if chunks is not None and not finished:
                # Closed early or cancelled: the actor's generation stops at its next token.
                with contextlib.suppress(Exception):
                    ray.cancel(chunks)


def unreachable(error: ray.exceptions.RayError, model: str) -> ProviderError:
    """A model actor that died or cannot be reached: transient, since Ray starts it again."""
    return ProviderConnectionError(
        f"the embedded model's actor could not answer ({type(error).__name__}: {error})",
        model=model,
    )


_installed: _Actors | None = None


def install_in_worker(config: ClusterConfig) -> None:
    """Send this worker's ``local/...`` models to the model actors."""
    global _installed
    actors = _installed = _Actors(config)
    register_provider("local", lambda name: RemoteLocalModel(name, actors))


def model_actors() -> list[str]:
    """The names of this job's model actors alive now (driver or worker side)."""
    prefix = _names_prefix(_current_job())
    found: list[dict[str, str]] = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        entry["name"]
        for entry in found
        if entry.get("namespace") == NAMESPACE and entry["name"].startswith(prefix)
    )


def stop_model_actors() -> None:
    """Kill this job's model actors (driver side, when its pool stops), and wait until their
    names are free, so that a pool made next does not find the dying ones."""
    if not ray.is_initialized():
        return
    names = model_actors()
    for name in names:
        with contextlib.suppress(ValueError):  # gone already
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    deadline = time.monotonic() + 30
    while names and time.monotonic() < deadline:
        names = model_actors()
        if names:
            time.sleep(0.05)
