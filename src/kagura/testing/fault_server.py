"""A fault-injecting OpenAI-compatible HTTP server, for testing clients over real sockets.

Built on the standard library (``asyncio`` streams, HTTP/1.1 by hand); a JSON answer is the fake
model's :func:`~kagura.providers.fake.example_for_schema` for the schema asked for. It binds
127.0.0.1, on an ephemeral port unless told otherwise, and serves ``POST /v1/chat/completions``
and ``GET /v1/models``. Each chat request takes its behaviour from the script (a queue of faults,
one consumed per request), else from a seeded random draw, else answers normally::

    async with FaultServer(script=["429", "500", "ok"]) as server:
        ...  # point a client at server.base_url (it ends with /v1)
    assert len(server.requests) == 3

or, from synchronous code or for a subprocess to reach, in a background thread::

    with FaultServer.run_in_thread(script=["hang"], hang_seconds=5) as server:
        ...

Faults: ``"ok"``, ``"429"`` (with ``Retry-After``), ``"500"``, ``"503"``, ``"401"``, ``"400"`` (any
other 3-digit status works too), ``"hang"`` (no answer until the client goes away or
``hang_seconds`` pass, then the connection is closed), ``"reset"`` (part of a response, then a TCP
RST), ``"malformed"`` (200 with a body that is not JSON), ``"html"`` (200 with an HTML page, as a
proxy or a captive portal answers, streamed requests too) and ``"truncated"`` (a
``Content-Length`` larger than the body, then close). :class:`Fault` adds options: a fixed answer
text, tool calls, the ``Retry-After`` value, a delay before answering, the usage reported.

Requests with ``"stream": true`` are answered with server-sent events, as OpenAI streams: a chunk
per word of the answer, one with the finish reason, one with the usage when
``stream_options.include_usage`` asks, then ``data: [DONE]``. Faults for streams, after
``Fault.after_chunks`` chunks of the answer (1 by default): ``"stream_reset"`` (a TCP RST),
``"stream_cut"`` (the body ends without a finish reason or ``[DONE]``), ``"stream_hang"`` (no
more until the client goes away or ``hang_seconds`` pass) and ``"stream_error"`` (an error event,
``data: {"error": {...}}``, as OpenAI reports a failure part-way, then the end of the body). To a
request that is not streamed they are ``"reset"``, ``"truncated"``, ``"hang"`` and ``"500"``.

``rules`` (or :meth:`FaultServer.set_rules`) pick a fault by prompt instead: a list of
``(substring, fault)`` pairs, the first whose substring occurs in the request's last user message
wins, every time it matches (rules are not consumed and come before the script)::

    FaultServer.run_in_thread(rules=[("slow", "hang")])  # hang on prompts mentioning "slow"

Every request is recorded (path, headers with credentials redacted, parsed JSON body, the fault
served, whether the client went away while waiting). From the command line::

    python -m kagura.testing.fault_server --port 8765 --script "429,500,ok"
    python -m kagura.testing.fault_server --random-faults 0.3 --seed 1

prints its base URL on the first line of stdout, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, TypeVar

from ..providers.fake import example_for_schema

__all__ = ["FAULT_KINDS", "Fault", "FaultServer", "RecordedRequest", "main"]

T = TypeVar("T")

logger: logging.Logger = logging.getLogger("kagura.testing.fault_server")

#: Faults with a behaviour of their own; any other 3-digit string is answered as that HTTP status.
FAULT_KINDS = (
    "ok",
    "429",
    "500",
    "503",
    "401",
    "400",
    "hang",
    "reset",
    "malformed",
    "html",
    "truncated",
    "stream_reset",
    "stream_cut",
    "stream_hang",
    "stream_error",
)
#: The faults that happen part-way through a stream, and what they are to a request that is not
#: streamed.
STREAM_FAULTS = {
    "stream_reset": "reset",
    "stream_cut": "truncated",
    "stream_hang": "hang",
    "stream_error": "500",
}
#: What ``random_faults`` draws from unless told otherwise: the transient failures a client should
#: survive by retrying (``hang`` needs a client timeout, 401/400 are not retryable).
DEFAULT_RANDOM_FAULTS = ("429", "500", "503", "reset", "malformed", "truncated")

REDACTED = "REDACTED"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("invalid request (fault injected)", "invalid_request_error", None),
    401: (
        "incorrect API key provided (fault injected)",
        "invalid_request_error",
        "invalid_api_key",
    ),
    429: ("rate limit reached (fault injected)", "rate_limit_error", "rate_limit_exceeded"),
    500: ("internal server error (fault injected)", "server_error", None),
    503: ("service unavailable (fault injected)", "server_error", None),
}


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted behaviour, with options; a plain string in a script means ``Fault(kind)``.

    - ``text``: the answer's content for ``"ok"`` (otherwise the server's answer, or an echo); for
      an HTTP status, the error's message.
    - ``tool_calls``: for ``"ok"``, answer with these tool calls instead of text; each is
      ``{"name": ..., "arguments": dict or JSON text, "id": optional}``.
    - ``retry_after``: the ``Retry-After`` header value (``"429"`` sends the server's default when
      this is ``None``; other statuses send it only when set).
    - ``delay``: seconds to wait before answering (the client going away is noticed and recorded).
    - ``usage``: ``(prompt_tokens, completion_tokens)`` to report instead of word counts.
    - ``finish_reason``: to report instead of ``"stop"`` (``"length"``: cut off by max_tokens;
      ``"tool_calls"`` with tool calls).
    - ``after_chunks``: for the stream faults, how many chunks of the answer come first.
    """

    kind: str = "ok"
    text: str | None = None
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    retry_after: float | str | None = None
    delay: float = 0.0
    usage: tuple[int, int] | None = None
    finish_reason: str | None = None
    after_chunks: int = 1

    def __post_init__(self) -> None:
        _check_kind(self.kind)

    @classmethod
    def ok(cls, text: str | None = None, **options: Any) -> Fault:
        """A normal answer, with ``text`` as its content (or the default answer)."""
        return cls("ok", text=text, **options)

    @classmethod
    def tool_call(cls, name: str, arguments: Any = None, *, id: str | None = None) -> Fault:
        """A normal answer that asks for one tool call."""
        call: dict[str, Any] = {"name": name, "arguments": {} if arguments is None else arguments}
        if id is not None:
            call["id"] = id
        return cls("ok", tool_calls=(call,))


ScriptItem = str | Fault


@dataclass(slots=True)
class RecordedRequest:
    """One request as the server received it. Credentials are never kept in clear."""

    index: int
    method: str
    path: str
    #: Lower-cased header names; ``authorization`` and other credential headers read ``REDACTED``.
    headers: dict[str, str]
    #: The parsed JSON body, or ``None`` (no body, or not JSON: see ``raw_body``).
    body: Any
    #: The body text when it was not JSON, else ``None``.
    raw_body: str | None = None
    #: The query string of the request's target (after ``?``), as sent.
    query: str = ""
    #: The fault served (``"ok"``, ``"429"``, ...); ``None`` for requests outside the chat API.
    fault: str | None = None
    #: The client closed the connection while the server was still holding the answer back.
    client_gone: bool = False
    #: When it arrived (``time.monotonic()`` in the server's process): for rates seen by the
    #: server, such as those of a cluster's shared rate limiter.
    received_at: float = 0.0
    _credential_digests: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of the body (empty if none)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("messages"), list):
            return list(self.body["messages"])
        return []

    def authorized_with(self, api_key: str) -> bool:
        """Whether the request carried ``Authorization: Bearer <api_key>`` (checked by digest)."""
        return self.authorization_was(f"Bearer {api_key}")

    def authorization_was(self, value: str) -> bool:
        """Whether the request's ``Authorization`` header was ``value`` (checked by digest)."""
        return self._credential_digests.get("authorization") == _digest(value)


class FaultServer:
    """An OpenAI-compatible server on 127.0.0.1 that misbehaves on cue. See the module docstring.

    Run it on the current event loop with ``async with FaultServer(...) as server``, or in a thread
    of its own with ``with FaultServer(...) as server`` (the same as
    ``FaultServer.run_in_thread(...)``). It stops, closing every connection, when the block exits.

    ``backlog`` is the listening socket's queue of connections not yet accepted (the kernel caps
    it at ``net.core.somaxconn``); asyncio's default of 100 overflows when hundreds of clients
    connect at once, and the kernel then drops their SYNs, to be retried a second or more later.
    """

    def __init__(
        self,
        script: Iterable[ScriptItem] = (),
        *,
        rules: Iterable[tuple[str, ScriptItem]] = (),
        port: int = 0,
        answer: str | None = None,
        json_answer: Any = None,
        random_faults: float = 0.0,
        seed: int | None = None,
        fault_kinds: Sequence[str] = DEFAULT_RANDOM_FAULTS,
        retry_after: float | str = 1,
        hang_seconds: float = 60.0,
        io_timeout: float = 30.0,
        model_name: str = "fault-model",
        backlog: int = 1024,
    ) -> None:
        if not 0.0 <= random_faults <= 1.0:
            raise ValueError(f"random_faults must be between 0 and 1, got {random_faults}")
        for kind in fault_kinds:
            _check_kind(kind)
        self.host = "127.0.0.1"
        self.port: int = port
        self.answer = answer
        self.json_answer: Any = json_answer
        self.random_faults = random_faults
        self.fault_kinds: tuple[str, ...] = tuple(fault_kinds)
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.io_timeout = io_timeout
        self.model_name = model_name
        self.backlog = backlog
        self._rng = random.Random(seed)
        self._script: deque[Fault] = deque(_as_fault(item) for item in script)
        self._rules: list[tuple[str, Fault]] = [(text, _as_fault(item)) for text, item in rules]
        self._requests: list[RecordedRequest] = []
        self._disconnects = 0
        #: Chat requests being answered right now, and the most there ever were at once.
        self.in_flight: int = 0
        self.max_in_flight: int = 0
        self._lock = threading.Condition()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._changed: asyncio.Event | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        #: Connections accepted so far (a client that reuses its connections opens few).
        self.connections_accepted: int = 0
        self._held: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None

    # -- configuration, usable from any thread ----------------------------------------------------

    def script(self, *items: ScriptItem) -> None:
        """Queue more faults, served after those already queued."""
        faults = [_as_fault(item) for item in items]
        with self._lock:
            self._script.extend(faults)

    def set_rules(self, *rules: tuple[str, ScriptItem]) -> None:
        """Replace the per-prompt rules (none: every request goes by the script again)."""
        parsed = [(text, _as_fault(item)) for text, item in rules]
        with self._lock:
            self._rules = parsed

    def set_answer(self, text: str | None) -> None:
        """The content of normal answers from now on (``None``: echo the last user message)."""
        self.answer = text

    def set_json_answer(self, value: Any) -> None:
        """The answer to requests asking for a JSON schema (a JSON text, or a value to encode);
        ``None``: the simplest value valid for the schema."""
        self.json_answer = value

    def hold_answers(self) -> None:
        """Hold every answer back, from now until :meth:`release_answers` (requests are still
        received and recorded): the calls of a burst are then all in flight at once, however
        slowly the client sends them. On the server's event loop only."""
        self._on_the_loop("hold_answers")
        if self._held is None or self._held.is_set():
            self._held = asyncio.Event()

    def release_answers(self) -> None:
        """Send the answers held back since :meth:`hold_answers` (each after its own delay)."""
        self._on_the_loop("release_answers")
        if self._held is not None:
            self._held.set()

    def _on_the_loop(self, what: str) -> None:
        if self._loop_thread != threading.get_ident():
            raise RuntimeError(f"FaultServer.{what}() is for the server's own event loop")

    @property
    def pending_script(self) -> list[Fault]:
        with self._lock:
            return list(self._script)

    # -- what happened ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the port is known once the server has started)."""
        if self._server is None and self.port == 0:
            raise RuntimeError("the fault server has not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending with ``/v1``."""
        return self.url + "/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order (a snapshot)."""
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The chat-completion requests received so far."""
        return [r for r in self.requests if r.fault is not None]

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def disconnects(self) -> int:
        """How many clients went away while the server was holding an answer back."""
        with self._lock:
            return self._disconnects

    def wait_for(self, predicate: Callable[[FaultServer], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate(server)`` holds; ``TimeoutError`` after ``timeout`` seconds.

        For threads other than the server's (use :meth:`wait` from async code)."""
        if self._server is not None and threading.get_ident() == self._loop_thread:
            raise RuntimeError("wait_for() would block the server's own loop: await wait()")
        with self._lock:
            if not self._lock.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"fault server: condition not met within {timeout}s")

    async def wait(
        self,
        predicate: Callable[[FaultServer], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - a bounded default, like the sync twin
    ) -> None:
        """Wait until ``predicate(server)`` holds; ``TimeoutError`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._changed is None:
            await asyncio.to_thread(self.wait_for, predicate, timeout)
            return
        changed = self._changed
        async with asyncio.timeout(timeout):
            while not predicate(self):
                changed.clear()
                await changed.wait()

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until ``count`` requests have arrived; returns them."""
        self.wait_for(lambda s: s.request_count >= count, timeout)
        return self.requests

    async def wait_requests(
        self,
        count: int,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[RecordedRequest]:
        """Wait until ``count`` requests have arrived; returns them."""
        await self.wait(lambda s: s.request_count >= count, timeout)
        return self.requests

    async def wait_disconnects(self, count: int = 1, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``count`` clients have gone away while an answer was held back."""
        await self.wait(lambda s: s.disconnects >= count, timeout)

    # -- running on the current loop --------------------------------------------------------------

    async def start(self) -> FaultServer:
        """Start listening on the running event loop (with ``port`` 0, ``port`` is then the one
        bound)."""
        if self._server is not None:
            raise RuntimeError("the fault server is already running")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(
            self._connected, self.host, self.port, limit=2**20, backlog=self.backlog
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("fault server listening on %s", self.base_url)
        return self

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._connections)
        for task, writer in list(self._connections.items()):
            task.cancel()
            writer.transport.abort()  # so that no read or write can go on
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await _bounded(server.wait_closed(), 5.0)

    async def __aenter__(self) -> FaultServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- running in a background thread -----------------------------------------------------------

    @classmethod
    def run_in_thread(cls, script: Iterable[ScriptItem] = (), **options: Any) -> FaultServer:
        """A server to use as ``with FaultServer.run_in_thread(...) as server``: it runs on an
        event loop in a background thread, so synchronous code and subprocesses can reach it."""
        return cls(script, **options)

    def __enter__(self) -> FaultServer:
        if self._thread is not None or self._server is not None:
            raise RuntimeError("the fault server is already running")
        started = threading.Event()
        failure: list[BaseException] = []

        async def run() -> None:
            self._thread_stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                started.set()
            try:
                await self._thread_stop.wait()
            finally:
                await self.stop()

        def main() -> None:
            with contextlib.suppress(BaseException):
                asyncio.run(run())

        self._thread = threading.Thread(target=main, name="kagura-fault-server", daemon=True)
        self._thread.start()
        if not started.wait(10.0):
            raise TimeoutError("the fault server thread did not start within 10s")
        if failure:
            self._thread.join(5.0)
            self._thread = None
            raise failure[0]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        thread, self._thread = self._thread, None
        loop, stop = self._loop, self._thread_stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(15.0)
        if thread.is_alive():
            raise TimeoutError("the fault server thread did not stop within 15s")

    # -- internals --------------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()
        if self._changed is not None:
            self._changed.set()

    def _next_fault(self, record: RecordedRequest) -> Fault:
        last_user = next(
            (
                _content_text(m.get("content"))
                for m in reversed(record.messages)
                if m.get("role") == "user"
            ),
            "",
        )
        with self._lock:
            for text, fault in self._rules:
                if text in last_user:
                    return fault
            if self._script:
                return self._script.popleft()
            if self.random_faults and self.fault_kinds and self._rng.random() < self.random_faults:
                return Fault(self._rng.choice(self.fault_kinds))
        return Fault("ok")

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A client connected: serve it in a task, listed at once. (Given a coroutine, asyncio
        would start the task itself, and a connection accepted just before ``stop()`` would run
        a task that ``stop()`` had not seen, outliving the server.)"""
        if self._server is None:  # stopping: accepted before the close, not to be served
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve_connection(reader, writer))
        self._connections[task] = writer
        with self._lock:
            self.connections_accepted += 1

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while await self._serve_one(reader, writer):
                pass
        except (
            asyncio.CancelledError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            TimeoutError,
        ):
            pass
        except Exception:  # a bug here must not take the whole server down
            logger.exception("fault server: error while serving a connection")
        finally:
            self._connections.pop(task, None)
            if not writer.transport.is_closing():
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; ``False`` when the connection is to be closed."""
        try:
            head = await _bounded(reader.readuntil(b"\r\n\r\n"), self.io_timeout)
        except (asyncio.IncompleteReadError, TimeoutError):
            return False
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            await self._send(writer, 400, {"error": {"message": "bad request line"}}, close=True)
            return False
        raw_headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                raw_headers[name.strip().lower()] = value.strip()
        if raw_headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body_bytes = await self._read_body(reader, raw_headers)
        keep_alive = raw_headers.get("connection", "").lower() != "close" and version.endswith(
            "1.1"
        )

        path, _, query = target.partition("?")
        record = self._record(method, path, query, raw_headers, body_bytes)
        if method == "POST" and path.rstrip("/") in ("/v1/chat/completions", "/chat/completions"):
            fault = self._next_fault(record)
            record.fault = fault.kind
            logger.info("fault server: %s %s -> %s", method, path, fault.kind)
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._notify()
            try:
                return await self._answer_chat(fault, record, reader, writer, keep_alive)
            finally:
                with self._lock:
                    self.in_flight -= 1
        self._notify()
        if method == "GET" and path.rstrip("/") in ("/v1/models", "/models"):
            models = {
                "object": "list",
                "data": [
                    {"id": self.model_name, "object": "model", "created": 0, "owned_by": "kagura"}
                ],
            }
            await self._send(writer, 200, models, close=not keep_alive)
        else:
            error = {"error": {"message": f"no route for {method} {path}", "type": "not_found"}}
            await self._send(writer, 404, error, close=not keep_alive)
        return keep_alive

    async def _read_body(self, reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size_line = await _bounded(reader.readuntil(b"\r\n"), self.io_timeout)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers (if any) end with an empty line.
                    while (await _bounded(reader.readuntil(b"\r\n"), self.io_timeout)) != (b"\r\n"):
                        pass
                    return b"".join(chunks)
                chunks.append(await _bounded(reader.readexactly(size), self.io_timeout))
                await _bounded(reader.readexactly(2), self.io_timeout)
        length = int(headers.get("content-length", "0") or 0)
        if length <= 0:
            return b""
        return await _bounded(reader.readexactly(length), self.io_timeout)

    def _record(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body_bytes: bytes
    ) -> RecordedRequest:
        shown = {k: (REDACTED if k in _SECRET_HEADERS else v) for k, v in headers.items()}
        digests = {k: _digest(v) for k, v in headers.items() if k in _SECRET_HEADERS}
        body: Any = None
        raw: str | None = None
        if body_bytes:
            text = body_bytes.decode("utf-8", "replace")
            try:
                body = json.loads(text)
            except ValueError:
                raw = text
        with self._lock:
            record = RecordedRequest(
                len(self._requests),
                method,
                path,
                shown,
                body,
                raw,
                query=query,
                received_at=time.monotonic(),
                _credential_digests=digests,
            )
            self._requests.append(record)
        return record

    async def _hold(self, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Hold the answer back for ``seconds``; ``False`` if the client went away meanwhile."""
        try:
            async with asyncio.timeout(seconds):
                while True:
                    data = await reader.read(1)
                    if not data:  # EOF: the client closed its end
                        return False
        except TimeoutError:
            return True
        except ConnectionError:
            return False

    async def _answer_chat(
        self,
        fault: Fault,
        record: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
    ) -> bool:
        kind = fault.kind
        streamed = isinstance(record.body, dict) and record.body.get("stream") is True
        if not streamed:
            kind = STREAM_FAULTS.get(kind, kind)
        held = self._held
        if held is not None and not held.is_set():
            await held.wait()
        wait = self.hang_seconds if kind == "hang" else fault.delay
        if wait > 0 and not await self._hold(reader, wait):
            with self._lock:
                record.client_gone = True
                self._disconnects += 1
            logger.info("fault server: request %d: the client went away", record.index)
            self._notify()
            return False
        close = not keep_alive
        if kind == "hang":  # the hang time passed: close without answering
            return False
        if streamed and kind in ("ok", "malformed", *STREAM_FAULTS):
            await self._answer_stream(fault, kind, record, reader, writer)
            return False
        if kind == "ok":
            await self._send(writer, 200, self._completion(fault, record), close=close)
            return keep_alive
        if kind == "malformed":
            await self._send(
                writer, 200, b'{"id": "chatcmpl-broken", "choices": [{"mess', close=close
            )
            return keep_alive
        if kind == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1>upstream unreachable</body></html>"
            html = {"content-type": "text/html"}
            await self._send(writer, 200, page, headers=html, close=close)
            return keep_alive
        if kind == "truncated":
            body = json.dumps(self._completion(fault, record)).encode()
            head = _head(200, {"content-type": "application/json"}, len(body) + 100, close=True)
            writer.write(head + body[: len(body) // 2])
            await _bounded(writer.drain(), self.io_timeout)
            writer.close()
            return False
        if kind == "reset":
            body = json.dumps(self._completion(fault, record)).encode()
            head = _head(200, {"content-type": "application/json"}, len(body), close=False)
            writer.write(head + body[: len(body) // 3])
            with contextlib.suppress(ConnectionError, TimeoutError):
                await _bounded(writer.drain(), self.io_timeout)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Linger on, for zero seconds: closing sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        status = int(kind)
        message, err_type, code = _ERRORS.get(
            status, (f"HTTP {status} (fault injected)", "server_error", None)
        )
        if fault.text is not None:
            message = fault.text
        headers: dict[str, str] = {}
        retry_after = fault.retry_after
        if retry_after is None and status == 429:
            retry_after = self.retry_after
        if retry_after is not None:
            headers["retry-after"] = _format_seconds(retry_after)
        error = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
        await self._send(writer, status, error, headers=headers, close=close)
        return keep_alive

    def _completion(self, fault: Fault, record: RecordedRequest) -> dict[str, Any]:
        body = record.body if isinstance(record.body, dict) else {}
        messages = record.messages
        message: dict[str, Any] = {"role": "assistant"}
        if fault.tool_calls:
            calls: list[dict[str, Any]] = []
            for n, call in enumerate(fault.tool_calls):
                arguments = call.get("arguments", {})
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments)
                calls.append(
                    {
                        "id": call.get("id") or f"call_{record.index}_{n}",
                        "type": "function",
                        "function": {"name": call["name"], "arguments": arguments},
                    }
                )
            message["content"] = fault.text
            message["tool_calls"] = calls
            finish = "tool_calls"
            produced = " ".join(c["function"]["arguments"] for c in calls)
        else:
            text = fault.text if fault.text is not None else self._default_text(body, messages)
            message["content"] = text
            finish = "stop"
            produced = text
        finish = fault.finish_reason or finish
        if fault.usage is not None:
            prompt_tokens, completion_tokens = fault.usage
        else:
            prompt_tokens = sum(len(_content_text(m.get("content")).split()) for m in messages)
            completion_tokens = len(produced.split())
        return {
            "id": f"chatcmpl-fault-{record.index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _answer_stream(
        self,
        fault: Fault,
        kind: str,
        record: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Answer a streamed request with server-sent events (the body ends when the connection
        closes), or break the stream as ``kind`` says."""
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            "connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1"))
        if kind == "malformed":
            writer.write(b'data: {"id": "chatcmpl-broken", "choices": [{"del\n\n')
            await _bounded(writer.drain(), self.io_timeout)
            return
        completion = self._completion(fault, record)
        body = record.body if isinstance(record.body, dict) else {}
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = _stream_events(completion, with_usage)
        answer = events[1:-2] if with_usage else events[1:-1]  # the answer's own chunks
        breaks_at = 1 + min(max(0, fault.after_chunks), len(answer)) if kind != "ok" else -1
        try:
            for n, event in enumerate([*events, "[DONE]"]):
                if n == breaks_at:
                    await self._break_stream(kind, record, reader, writer)
                    return
                data = event if isinstance(event, str) else json.dumps(event)
                writer.write(f"data: {data}\n\n".encode())
                await _bounded(writer.drain(), self.io_timeout)
        except ConnectionError:
            self._client_went(record)

    async def _break_stream(
        self,
        kind: str,
        record: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if kind == "stream_reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:  # closing sends RST instead of FIN (see "reset")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif kind == "stream_hang" and not await self._hold(reader, self.hang_seconds):
            self._client_went(record)
        elif kind == "stream_error":
            error = {
                "message": "the model failed mid-answer (fault injected)",
                "type": "server_error",
            }
            writer.write(f"data: {json.dumps({'error': error})}\n\n".encode())
            await _bounded(writer.drain(), self.io_timeout)  # a client gone: see _answer_stream
        # "stream_cut", or a hang that ran its time: the body just ends (the caller closes).

    def _client_went(self, record: RecordedRequest) -> None:
        with self._lock:
            record.client_gone = True
            self._disconnects += 1
        logger.info("fault server: request %d: the client went away", record.index)
        self._notify()

    def _default_text(self, body: Mapping[str, Any], messages: list[dict[str, Any]]) -> str:
        last_user = next(
            (
                _content_text(m.get("content"))
                for m in reversed(messages)
                if m.get("role") == "user"
            ),
            "",
        )
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") in (
            "json_schema",
            "json_object",
        ):
            if self.json_answer is not None:
                value = self.json_answer
                return value if isinstance(value, str) else json.dumps(value)
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                return "{}"
            return json.dumps(example_for_schema(schema, last_user))
        if self.answer is not None:
            return self.answer
        return last_user

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        all_headers = {"content-type": "application/json", **(headers or {})}
        writer.write(_head(status, all_headers, len(body), close=close) + body)
        await _bounded(writer.drain(), self.io_timeout)


async def _bounded(awaitable: Awaitable[T], seconds: float | None) -> T:
    """``awaitable``, with a time limit. Not ``asyncio.wait_for``: on Python 3.11 it can swallow a
    cancellation that arrives as the awaited operation completes, and ``stop()`` relies on it."""
    async with asyncio.timeout(seconds):
        return await awaitable


def _stream_events(completion: Mapping[str, Any], with_usage: bool) -> list[dict[str, Any]]:
    """The chunks of ``completion`` as OpenAI streams it: the role, the text a word at a time
    (tool calls: the id and name, then the arguments in two pieces), the finish reason, and the
    usage when asked for."""
    choice = completion["choices"][0]
    message = choice["message"]
    base = {k: completion[k] for k in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": word}) for word in _WORDS.findall(message.get("content") or "")]
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call["function"]
        opening = {"id": call["id"], "type": "function"}
        opening["function"] = {"name": function["name"], "arguments": ""}
        events.append(chunk({"tool_calls": [{"index": index, **opening}]}))
        arguments = function["arguments"]
        half = len(arguments) // 2
        for piece in (arguments[:half], arguments[half:]):
            more = {"index": index, "function": {"arguments": piece}}
            events.append(chunk({"tool_calls": [more]}))
    events.append(chunk({}, choice["finish_reason"]))
    if with_usage:
        events.append({**base, "choices": [], "usage": completion["usage"]})
    return events


_WORDS = re.compile(r"\s*\S+|\s+$")


def _check_kind(kind: str) -> None:
    if kind in FAULT_KINDS or (len(kind) == 3 and kind.isdigit() and 100 <= int(kind) <= 599):
        return
    raise ValueError(f"unknown fault {kind!r}: use one of {', '.join(FAULT_KINDS)} or a status")


def _as_fault(item: ScriptItem) -> Fault:
    if isinstance(item, Fault):
        return item
    if isinstance(item, str):
        return Fault(item.strip())
    raise TypeError(f"a script item is a fault name or a Fault, not {item!r}")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _format_seconds(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _head(status: int, headers: Mapping[str, str], length: int, *, close: bool) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {length}")
    lines.append(f"connection: {'close' if close else 'keep-alive'}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kagura.testing.fault_server``: serve until interrupted (or ``--exit-after``)."""
    parser = argparse.ArgumentParser(
        prog="python -m kagura.testing.fault_server",
        description="A fault-injecting OpenAI-compatible server on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    parser.add_argument("--script", default="", help='faults in order, e.g. "429,500,ok"')
    parser.add_argument("--random-faults", type=float, default=0.0, help="fault probability")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random faults")
    parser.add_argument(
        "--fault-kinds",
        default=",".join(DEFAULT_RANDOM_FAULTS),
        help="the faults random mode draws from (comma-separated)",
    )
    parser.add_argument("--answer", default=None, help="content of normal answers (default: echo)")
    parser.add_argument("--retry-after", default="1", help="Retry-After of 429 answers (seconds)")
    parser.add_argument("--hang-seconds", type=float, default=60.0, help="how long a hang lasts")
    parser.add_argument("--exit-after", type=float, default=None, help="stop after these seconds")
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    try:
        server = FaultServer(
            [s for s in args.script.split(",") if s.strip()],
            port=args.port,
            answer=args.answer,
            random_faults=args.random_faults,
            seed=args.seed,
            fault_kinds=[k.strip() for k in args.fault_kinds.split(",") if k.strip()],
            retry_after=args.retry_after,
            hang_seconds=args.hang_seconds,
        )
    except ValueError as exc:
        parser.error(str(exc))

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        async with server:
            print(server.base_url, flush=True)
            with contextlib.suppress(TimeoutError):
                await _bounded(stop.wait(), args.exit_after)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
