"""The HTTP wire to OpenAI-compatible servers: JSON requests and server-sent event streams over
aiohttp, their failures as Kagura's :class:`~kagura.errors.ProviderError` family.

Why not the ``openai`` SDK, over the same aiohttp: at 1,000 concurrent calls it spent 1.0 to
2.1 ms of client CPU per call, against 0.12 to 0.20 ms for aiohttp alone, by machine
(benchmarks/bench_fanout.py).
That CPU goes into deep copies of each request's options and httpx2's request, header and URL
objects, made and then turned into aiohttp's; none of it can be switched off from outside.
Kagura sends a body it built as plain JSON, owns retries and timeouts in its policies, and reads
the answer's JSON itself (:func:`kagura.providers._chat.to_response`), so nothing the SDK adds is
left to do. aiohttp has no reader of server-sent events: :func:`_events` is one.

One :class:`Client` per (base URL, event loop): an aiohttp session holds a connection pool bound
to the loop that made it, and is closed when that loop shuts down. Credentials are not the
client's: each request carries its own (:class:`Auth`), so a service that calls with a key per
user keeps one session and one pool per endpoint, not one per key (each a socket or more, never
released while the loop lives).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .. import pricing
from ..errors import ProviderConnectionError, ProviderTimeout, UsageError
from ._chat import (
    Secrets,
    answer_error,
    error_message,
    header_secrets,
    status_error,
    without_credentials,
)
from ._chunks import completion_chunk

if TYPE_CHECKING:
    import ssl

    import aiohttp

#: Where requests go when neither the agent nor the environment names a base URL (OpenAI's).
OPENAI_BASE_URL = "https://api.openai.com/v1"

#: The connection pool of each client: as many connections as calls in flight, up to this many
#: (more calls wait for a free connection), and every idle one kept for KEEPALIVE_SECONDS, so
#: that the next burst of a fan-out reuses them rather than opening as many again.
MAX_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 30.0

#: How long to wait to connect, and for each read, unless the request says otherwise. Kagura's
#: own ``timeout=`` policies bound a call; this only ends a request nothing else would end.
DEFAULT_TIMEOUT = 600.0

#: A request's keyword arguments that are options of the request rather than fields of its
#: body: the names ``openai``'s ``chat.completions.create`` gives them, so that
#: ``provider_kwargs`` written for the SDK keep working.
REQUEST_OPTIONS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})

#: How much of an answer that is not what was asked for (a proxy's HTML page, say) its error
#: quotes.
SHOWN = 300


class Auth:
    """The credentials of requests to one base URL with one API key: the headers they carry, and
    what their errors leave out."""

    __slots__ = ("api_key", "base_url", "headers", "secrets")

    def __init__(self, base_url: str | None, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.headers, secrets = _credentials(base_url or OPENAI_BASE_URL, api_key)
        #: What errors leave out, should a server quote it back: the key, or the URL's
        #: credentials and the basic authorization made of them.
        self.secrets = (api_key, *secrets)

    def secrets_for(self, kwargs: Mapping[str, Any]) -> tuple[str, ...]:
        """What the errors of a request of ``kwargs`` leave out: these credentials and those
        among the request's extra headers."""
        extra = kwargs.get("extra_headers")
        return (*self.secrets, *header_secrets(extra)) if extra else self.secrets


class Client:
    """Chat completions at one base URL, on one event loop, with the credentials of each
    request."""

    __slots__ = ("proxy", "session", "url", "where")

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.where = base_url
        self.proxy = _proxy_for(base_url)

    async def complete(
        self, kwargs: Mapping[str, Any], model_id: str, hint: str, auth: Auth
    ) -> Any:
        """POST ``kwargs`` (the body, and any request options) with ``auth``'s credentials and
        return the answer's JSON."""
        secrets = auth.secrets_for(kwargs)
        request = self._request(kwargs, model_id, auth)
        with self._failures_mapped(model_id, hint):
            async with self.session.post(self.url, **request) as response:
                raw = await response.read()
        return self._answer(response, raw, model_id, secrets)

    async def stream(
        self, kwargs: Mapping[str, Any], model_id: str, hint: str, auth: Auth
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POST ``kwargs`` with ``stream=True`` and return the chunks of the answer as they come:
        the JSON of each server-sent event up to ``[DONE]``. The response is open once this
        returns (a rejection is raised here, not on the first chunk), and closed however the
        iteration ends: closing it is what tells the server to stop generating.

        A server that answers with a JSON body instead (it ignores ``stream=true``, or it
        reports an error with HTTP 200) is read as :meth:`complete` reads it: an error is raised
        here, a whole completion is the one chunk of the stream."""
        secrets = auth.secrets_for(kwargs)
        request = self._request(kwargs, model_id, auth)
        with self._failures_mapped(model_id, hint):
            response = await self.session.post(self.url, **request)
            if response.status >= 400 or response.content_type == "application/json":
                try:
                    raw = await response.read()
                finally:
                    response.close()
                completion = self._answer(response, raw, model_id, secrets)
                try:
                    return _whole(completion_chunk(completion))
                except (AttributeError, IndexError, KeyError, TypeError) as exc:
                    raise answer_error(
                        model_id, f"malformed response: {exc}", _text(raw), secret=secrets
                    ) from exc
        return self._chunks(response, model_id, hint, secrets)

    def _answer(
        self, response: aiohttp.ClientResponse, raw: bytes, model_id: str, secrets: Secrets
    ) -> Any:
        """The JSON of a whole answer, or the error it is: an HTTP error status, a body that is
        not JSON, or an error object sent with HTTP 200 (some servers and proxies report a
        refused key or an exhausted quota so)."""
        if response.status >= 400:
            raise status_error(
                model_id, response.status, response.headers, _text(raw), secret=secrets
            )
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # not JSON, or nested past Python's stack
            raise answer_error(
                model_id,
                f"malformed response: {exc}{_not_json(response, raw)}",
                _text(raw),
                secret=secrets,
            ) from exc
        if _is_error(data):
            # The server answered so on purpose: an error of the status it names (OpenRouter
            # sends its errors' HTTP status as their code), else of its 200, never retried.
            raise status_error(
                model_id,
                _error_status(data) or response.status,
                response.headers,
                _text(raw),
                secret=secrets,
            )
        return data

    async def _chunks(
        self, response: aiohttp.ClientResponse, model_id: str, hint: str, secrets: Secrets
    ) -> AsyncGenerator[dict[str, Any], None]:
        try:
            head = bytearray()
            events = _events(response.content.iter_any(), head)
            some = False
            while True:
                with self._failures_mapped(model_id, hint):
                    try:
                        event, data = await anext(events)
                    except StopAsyncIteration:
                        if some or response.content_type == "text/event-stream":
                            return  # a stream cut short, which the reader of chunks reports
                        # Something else answered with 200 (a proxy's or a portal's page): say
                        # so, rather than call it a stream that was cut.
                        raise answer_error(
                            model_id,
                            "the answer is not a stream of server-sent events"
                            + _not_json(response, bytes(head)),
                            _text(bytes(head)),
                            secret=secrets,
                        ) from None
                some = True
                if data.startswith("[DONE]"):
                    return
                yield _chunk(event, data, model_id, secrets)
        finally:
            response.close()

    def _request(self, kwargs: Mapping[str, Any], model_id: str, auth: Auth) -> dict[str, Any]:
        """aiohttp's arguments for a request of ``kwargs``: the body, as JSON, ``auth``'s
        headers, and the options."""
        body = {k: v for k, v in kwargs.items() if k not in REQUEST_OPTIONS}
        headers = auth.headers
        try:
            body.update(kwargs.get("extra_body") or {})
            if kwargs.get("extra_headers"):
                headers = {**headers, **kwargs["extra_headers"]}
            data = json.dumps(body, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"the request to {model_id} cannot be sent ({exc}): give provider_kwargs and "
                f"messages as JSON values (str, int, float, bool, None, lists, dicts), and "
                f"extra_body and extra_headers as dicts"
            ) from exc
        request: dict[str, Any] = {"data": data, "headers": headers, "proxy": self.proxy}
        if kwargs.get("extra_query"):
            request["params"] = _query(kwargs["extra_query"], model_id)
        if kwargs.get("timeout") is not None:
            request["timeout"] = _timeout(kwargs["timeout"])
        return request

    @contextlib.contextmanager
    def _failures_mapped(self, model_id: str, hint: str) -> Iterator[None]:
        """aiohttp's errors as Kagura's: a timeout as :class:`~kagura.errors.ProviderTimeout`,
        anything else that broke the connection (refused, reset, closed before or while
        answering, a body cut short) as :class:`~kagura.errors.ProviderConnectionError`,
        naming the address and, in ``hint``, where it came from."""
        import aiohttp

        try:
            yield
        except TimeoutError as exc:  # aiohttp's own timeouts (ServerTimeoutError, ...) too
            raise ProviderTimeout(f"request to {self.where} timed out", model=model_id) from exc
        except (aiohttp.ClientError, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ProviderConnectionError(
                f"connection to {self.where} failed: {detail}{hint}", model=model_id
            ) from exc


#: Where a line of server-sent events ends: CRLF, LF or CR, as the format allows.
_LINE_END = re.compile(rb"\r\n|[\r\n]")


async def _events(chunks: AsyncIterator[bytes], head: bytearray) -> AsyncIterator[tuple[str, str]]:
    """The server-sent events in a body, as (event name, data) pairs, in the format servers send
    (https://html.spec.whatwg.org/multipage/server-sent-events.html): fields ``name: value`` a
    line each, ``data`` lines joined, a blank line ending the event, lines starting with ``:``
    comments. An event the body ends in the middle of is dropped, as the format says. ``head``
    gets the first :data:`SHOWN` bytes of the body, for an error to quote."""
    buffer = b""
    name = ""
    data: list[str] = []
    after_cr = False
    async for chunk in chunks:
        if len(head) < SHOWN:
            head += chunk[: SHOWN - len(head)]
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the second half of a CRLF split between two reads
        after_cr = chunk.endswith(b"\r")
        buffer += chunk
        if b"\r" in buffer:
            *lines, buffer = _LINE_END.split(buffer)
        else:  # most servers end lines with LF alone
            *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if not line:
                if data:
                    yield name, "\n".join(data)
                name, data = "", []
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value


def _chunk(event: str, data: str, model_id: str, secret: Secrets) -> dict[str, Any]:
    """One event's chunk, or the error a server reports part-way through a stream (``secret``,
    the API key, left out of it)."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError) as exc:  # not JSON, or nested past Python's stack
        raise answer_error(model_id, f"malformed stream chunk: {exc}", data, secret=secret) from exc
    error = chunk.get("error") if isinstance(chunk, dict) else None
    if error or event == "error":
        message = error_message(chunk) if isinstance(chunk, dict) else None
        raise answer_error(
            model_id,
            f"error event in the stream: {message or 'an error occurred during streaming'}",
            data,
            secret=secret,
        )
    if not isinstance(chunk, dict):
        raise answer_error(
            model_id, "malformed stream chunk: not a JSON object", data, secret=secret
        )
    return chunk


async def _whole(chunk: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    yield chunk


def _is_error(data: Any) -> bool:
    """Is this JSON answer an error object (``{"error": ...}``, or vLLM's
    ``{"object": "error", ...}``) rather than a completion?"""
    if not isinstance(data, dict) or data.get("choices"):
        return False
    return bool(data.get("error")) or data.get("object") == "error"


def _error_status(data: dict[str, Any]) -> int | None:
    """The HTTP error status an error object names as its code, if any."""
    inner = data.get("error", data)
    code = inner.get("code") if isinstance(inner, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return None


def _query(params: Any, model_id: str) -> dict[str, str]:
    """``extra_query`` as aiohttp takes it: text values, booleans written as httpx (and so the
    SDK) writes them, ``true`` and ``false``."""
    if not isinstance(params, Mapping):
        raise UsageError(
            f"the request to {model_id} cannot be sent: give extra_query as a dict of query "
            f"parameters, not {type(params).__name__}"
        )
    return {
        str(name): ("true" if value else "false") if isinstance(value, bool) else str(value)
        for name, value in params.items()
    }


def _timeout(value: Any) -> aiohttp.ClientTimeout:
    import aiohttp

    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UsageError(
            f"provider_kwargs timeout={value!r}: give the seconds to wait to connect and for each "
            f"read as a positive number (the agent's own timeout= bounds the whole call)"
        )
    return aiohttp.ClientTimeout(total=None, sock_connect=value, sock_read=value)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _not_json(response: aiohttp.ClientResponse, raw: bytes) -> str:
    """What the server sent instead, for an error to say, when it did not say it sent JSON:
    its content type and the start of its body (a proxy's error page is the usual case)."""
    if response.content_type == "application/json":
        return ""
    shown = _text(raw[:SHOWN]).strip()
    return f" (HTTP {response.status}, {response.content_type}: {shown!r})"


def _credentials(base_url: str, api_key: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The headers of every request to ``base_url`` with ``api_key``, and the URL's credentials
    as they may come back quoted in an answer (none for a URL without).

    A URL with credentials in it (``user:password@``) stands for HTTP basic authentication, in
    place of the API key's bearer token (aiohttp refuses to send a request to such a URL with an
    Authorization header of its own). ``OPENAI_ORG_ID`` and ``OPENAI_PROJECT_ID`` are sent as
    the ``openai`` SDK sends them."""
    parts = urllib.parse.urlsplit(base_url)
    secrets: tuple[str, ...] = ()
    if parts.username is None and parts.password is None:
        authorization = f"Bearer {api_key}"
    else:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
        # As sent, and as written in the URL (percent-encoded), for a server may quote either.
        written = (f"{parts.username or ''}:{parts.password or ''}", parts.password or "")
        secrets = tuple(dict.fromkeys((token, f"{user}:{password}", password, *written)))
    headers = {
        "Authorization": authorization,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    for header, env in (
        ("OpenAI-Organization", "OPENAI_ORG_ID"),
        ("OpenAI-Project", "OPENAI_PROJECT_ID"),
    ):
        if os.environ.get(env):
            headers[header] = os.environ[env]
    return headers, secrets


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``
    and ``NO_PROXY``, in upper or lower case), read once per client as httpx reads them.
    aiohttp's ``trust_env=True`` would read them, and look for a ``.netrc``, in a worker thread
    on every request: two thread hand-offs a call, a fifth of the client's CPU per call in a
    fan-out (benchmarks/bench_fanout.py)."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


# One client per (base URL without credentials, loop), with the async generator that closes it
# when the loop shuts down (see _closed_with_the_loop): no key or password is kept in it, and
# its size is bounded by the endpoints called, not by the keys they are called with. Event
# loops in other threads read and prune it too: under _clients_lock.
_clients: dict[
    tuple[str, int], tuple[asyncio.AbstractEventLoop, Client, AsyncGenerator[None, None]]
] = {}
_clients_lock = threading.Lock()


async def client(base_url: str | None) -> Client:
    """The client for ``base_url`` (OpenAI's when ``None``; any credentials in it are the
    requests', see :class:`Auth`) on the running loop, made on first use (tens of milliseconds
    on a new loop: nothing is imported, the TLS context is shared)."""
    base_url = without_credentials(base_url or OPENAI_BASE_URL)
    loop = asyncio.get_running_loop()
    key = (base_url, id(loop))
    with _clients_lock:
        cached = _clients.get(key)
        if cached is not None and cached[0] is loop:
            return cached[1]
        for stale in [k for k, (lp, _, _) in _clients.items() if lp.is_closed()]:
            del _clients[stale]
    # Nothing between here and the insertion gives way to this loop's other tasks, so no other
    # client for this key is made meanwhile; other loops' keys are other keys.
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS, ssl=tls()
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=DEFAULT_TIMEOUT, sock_read=DEFAULT_TIMEOUT
        ),
        # The environment's proxy is read once, by Client (see _proxy_for).
        trust_env=False,
        # Shared by the requests of every key: a cookie a server sets in answer to one
        # caller's request must not go with another's.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    made = Client(session, base_url)
    closer = _closed_with_the_loop(session)
    await anext(closer)
    with _clients_lock:
        _clients[key] = (loop, made, closer)
    return made


async def _closed_with_the_loop(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """Closes ``session`` (its connections) when its event loop shuts down.

    An aiohttp session left open when its loop ends says so on stderr ("Unclosed client
    session") when it is collected, and asyncio has no callback for a loop's end. What it does
    have: ``loop.shutdown_asyncgens()``, which ``asyncio.run`` (and ``asyncio.Runner``) call
    before closing the loop, finalises every async generator still suspended in it. This one
    is suspended for the session's lifetime (the loop keeps a weak reference, ``_clients`` the
    strong one), and its ``finally`` closes the session.
    """
    try:
        yield
    finally:
        await session.close()


#: The TLS settings of every client: the system's certificates (or SSL_CERT_FILE and
#: SSL_CERT_DIR), loaded once per process. A session left to make its own loads them for each
#: event loop: 25 ms each time.
_tls_context: ssl.SSLContext | None = None


def tls() -> ssl.SSLContext:
    """httpx2's context: it finds the system's certificates where Python's own defaults miss
    them (the OS trust store on macOS and Windows, a bundle's usual paths elsewhere)."""
    global _tls_context
    if _tls_context is None:
        import httpx2

        _tls_context = httpx2.create_ssl_context()
    return _tls_context


def load() -> None:
    """Everything the first request would otherwise import on the event loop: aiohttp, the TLS
    certificates, and what prices its answer (genai-prices and its table of prices)."""
    import aiohttp  # noqa: F401

    tls()
    pricing.load()
