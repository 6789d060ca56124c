"""The recorder: an instrumentation sink that writes every span and event to the event store.

A finished span reaches its row in three hops:

1. on the event loop, :meth:`Recorder.span_finished` builds the span's row (plain values: the
   span already carries its subtree's tokens, cost, LLM calls and retries, see
   :func:`kagura._instrument.close`) and appends it to a list;
2. the recorder's thread takes what is queued (every ``flush_interval``, or at once when a
   batch's worth is queued) and sends it to the writer, a process of its own
   (:mod:`._writer`: marshal frames through a pipe);
3. the writer process redacts (and encrypts) the rows and inserts them into the tables, one
   transaction per batch (:meth:`._writer.StoreWriter.write`: the only write path).

Readers never do the writer's work: a query reads the tables as they are, waiting only for this
process's recorder to flush when it records to the same store, so that what just finished is
seen. Recording never blocks the loop on disk I/O, never touches the recorded function's result
or exception, and nothing is lost on exit: an ``atexit`` hook hands what is queued to the writer
process and leaves it to commit it after this process has gone (:meth:`Recorder.hand_off`;
readers wait for it meanwhile, see :mod:`._handoff`). Waiting for the commit instead made a
script of one agent call on the fake model take 0.5 to 0.8 s longer: the writer's start-up (an
interpreter importing Kagura and SQLAlchemy, then opening the store), not its writing. Without a
writer process (or a lock file) the hook waits for the flush.

Why a writer process rather than a thread: storing a span's row costs the writer about 95,000
instructions (callgrind, a burst of 18,000 rows into a fresh SQLite store), some 25 µs: about
55,000 inside sqlite3, binding included (the four secondary indexes take 7,000 to 8,000 each),
the rest Python deriving the stored columns and looking for secrets. In a thread of this
process much of that holds the GIL against the event loop; in a process of its own it runs on
another core. Measured with ``benchmarks/bench_overhead.py --only raw --only "recording on"`` on
the same (loaded, 2-core) machine: 149 µs per agent step with a writer thread, 78-132 µs with
the writer process. If the process cannot be started, or dies, the recorder writes from its
thread with the same :class:`~._writer.StoreWriter`.

Why no staging: earlier versions made a burst's batches durable as one blob each in a staging
table and wrote them into the indexed tables later, readers doing so before their first query.
That kept the flush cheap (the rows' insertion was left for later: the first query after a burst
of 10,000 spans took 0.26 s, after larger ones seconds) at the price of a second write path, a
merge on every read and readers that wrote. Here the flush pays for the insertion (the same
burst: flush 0.15 s, then the first query 3 ms). What that costs, measured: at 2.25 rows an
agent step, the writer needs more CPU per step than the event loop spends on the step itself,
so in a burst it falls behind and the final flush waits for its backlog. In
``bench_overhead.py`` (2,000 concurrent runs of 4 steps on a zero-latency model, the flush
included) recording on costs 5-7x raw asyncio per step, against 3.0-3.8x with staging: the
target of 3x is missed. The simpler design is kept all the same, for one write path and readers
that never write. The recording's own cost on the event loop is what it was with staging (about
58,000 instructions per step, counted with callgrind). What would bring the target back is a
cheaper writer, not a second path: less Python per row. (The indexes stay: the rollups that
answer the statistics, counted by the writer at about a sixth of its time per row, leave the
indexes the lists, traces and exact percentiles read.)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import marshal
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _settings
from .._context import Span
from .._events import Event, SpanEvent, SpanFinished, SpanStarted
from .._instrument import close
from .._settings import ContentMode
from ..errors import StoreError
from ._content import (
    recorded,
    recorded_messages,
    recorded_result,
    to_json,
    to_text,
)
from ._handoff import WriterLock
from ._writer import (
    ROW_WIDTH,
    WRITER_THREAD,
    Row,
    StoreWriter,
    plain,
    plain_values,
    receive,
    rows_of,
    send,
    this_sender,
)
from ._writer_log import StderrRelay, relayed

_log = logging.getLogger("kagura.recorder")

#: How long a span runs before it is written as running (``kagura monitor live`` shows it, and if
#: its process is killed it is closed as interrupted once that is known: see _interrupted).
#: With the look every quarter of a second below, every call in flight for half a second is on
#: record; most spans end sooner, and a row each would double the writer's work.
_RUNNING_AFTER_NS = 250_000_000
#: Queued rows (in values) for which the loop wakes the recorder's thread before its flush
#: interval is up.
_WAKE_AT = 1000 * ROW_WIDTH
#: How often the writer's thread looks for spans open long enough to be written as running. A
#: look walks every open span while holding the GIL (thousands, in a large fan-out), so not at
#: every batch.
_OPEN_SPANS_EVERY_NS = 250_000_000


#: What the recorder keeps of an open span's start: its model, its inputs (as the writer takes
#: them, see ``_content.recorded``), and whether its running row was written.
_Started = list[Any]


class _FlushMarker:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _SidecarGone(Exception):
    """The writer process stopped answering."""


class _StoreUnopenable(Exception):
    """The writer process could not open the store (nor would this one): its message says
    which store and why."""


class _RecordingOff(Exception):
    """The writer process died and this one cannot open the store either."""


class _Sidecar:
    """The client end of a writer process (:func:`kagura.observability._writer.main`): frames
    into its stdin, replies from its stdout. Used by the recorder's thread only."""

    def __init__(self, url: str, content: ContentMode) -> None:
        # The same kagura as this process's, wherever it was imported from.
        here = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": here if not path else f"{here}{os.pathsep}{path}"}
        #: The writer's lock file, which lets this process leave before its rows are committed
        #: (see _handoff); without one (not POSIX), this process waits for its writer at exit.
        self.lock = WriterLock.create(url)
        # A stderr that is a pipe is relayed rather than inherited: see _writer_log.
        relay = relayed()
        self.process = subprocess.Popen(
            # The recording process's pid given, not read as the parent's: in a short script the
            # parent may have gone (and the writer been adopted) before the writer asks.
            [
                sys.executable,
                "-c",
                f"from kagura.observability._writer import main; main({os.getpid()})",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if relay else None,
            close_fds=True,
            pass_fds=() if self.lock is None else (self.lock.fd,),
            env=env,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.relay = StderrRelay(self.process.stderr) if self.process.stderr else None
        self._inbox = self.process.stdin
        _widen_pipe(self._inbox.fileno())
        self._outbox = self.process.stdout
        self._tokens = itertools.count(1)
        self.written_spans = 0
        self.written_events = 0
        self.failed_batches = 0
        # The URL goes through the pipe, not the command line: it may hold a password.
        lock_path = None if self.lock is None else str(self.lock.path)
        self._send(marshal.dumps(("open", url, content, lock_path)))

    def forget_in_child(self) -> None:
        """In a forked child: let go of this process's copies of the pipes and the lock file.
        Each descriptor is pointed at /dev/null rather than closed, so that the objects still
        holding it (the pipe's buffered file, with what the parent had not sent yet) close it
        harmlessly, not a descriptor the child has reused for something else meanwhile."""
        fds = [] if self.lock is None else [self.lock.fd]
        if self.relay is not None:
            fds += self.relay.fds()
        for pipe in (self._inbox, self._outbox):
            with contextlib.suppress(ValueError):  # closed already
                fds.append(pipe.fileno())
        null = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.dup2(null, fd)
        finally:
            os.close(null)

    def wait_opened(self, say: Callable[[str], bool]) -> None:
        """Wait for the writer to have opened the store (its interpreter starts meanwhile).

        If it could not, ``say(why)`` says so, unless this process is leaving (it returns
        ``False``): the writer then says it, having waited to hear which (see
        ``_writer.refuse``), so that it is said once, even when this process hands its rows off
        just as the answer comes."""
        reply = self._receive()
        if not reply[1]:
            if say(reply[2]):
                with contextlib.suppress(_SidecarGone):
                    self._send(marshal.dumps(("said",)))
            self.close()
            raise _StoreUnopenable(reply[2])

    def hand_off(self, running: list[Row], finished: list[Any], events: list[Row]) -> None:
        """Send the last rows and leave the writer to commit them after this process has gone;
        readers wait for it meanwhile (its lock, held from now on, ends with it)."""
        assert self.lock is not None
        self.lock.hold()
        if running or finished or events:
            self.write(running, finished, events)
        with contextlib.suppress(OSError):
            self._inbox.close()  # the writer finishes what it has read, then exits
        if self.relay is not None:  # nobody will read it: the writer says the rest in its log
            self.relay.stop()

    def write(self, running: list[Row], finished: list[Any], events: list[Row]) -> None:
        """Send rows: ``finished`` as the flat list of values the recorder queues them in."""
        self._send(_rows_message(running, finished, events))

    def sync(self) -> None:
        """Wait until the writer has committed everything sent so far."""
        token = next(self._tokens)
        self._send(marshal.dumps(("sync", token)))
        while True:
            reply = self._receive()
            if reply[0] == "synced" and reply[1] == token:
                self.written_spans, self.written_events, self.failed_batches = reply[2:5]
                return

    def close(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(OSError):
            self._inbox.close()  # the writer finishes what it has read, then exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.relay is not None:
            self.relay.stop()
        self._outbox.close()
        if self.lock is not None:
            self.lock.close()

    def _send(self, payload: bytes) -> None:
        try:
            send(self._inbox, payload)
        except (OSError, ValueError) as exc:  # a closed pipe: the writer process has ended
            raise _SidecarGone(str(exc)) from exc

    def _receive(self) -> tuple[Any, ...]:
        try:
            reply = receive(self._outbox)
        except (OSError, ValueError, EOFError) as exc:
            raise _SidecarGone(str(exc)) from exc
        if reply is None:
            raise _SidecarGone(f"the writer process ended (exit code {self.process.poll()})")
        return reply


def _rows_message(running: list[Row], finished: list[Any], events: list[Row]) -> bytes:
    sender = this_sender()
    try:
        return marshal.dumps(("rows", running, finished, events, *sender))
    except ValueError:  # a value marshal cannot carry (the recorder makes none): as text
        return marshal.dumps(
            ("rows", plain(running), plain_values(finished), plain(events), *sender)
        )


def _widen_pipe(fd: int) -> None:
    """A pipe of 1 MiB where Linux allows it (64 KiB by default): a batch then fits whole, and
    the recorder's thread rarely waits for the writer process to read."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass


class Recorder:
    """Writes instrumentation records to the store at ``url`` (a SQLite path or a database URL),
    through a writer process of its own (``process=False``: a thread of this one)."""

    def __init__(
        self,
        url: str | Path,
        *,
        content: ContentMode | None = None,
        flush_interval: float = 0.25,
        batch_size: int = 5000,
        process: bool | None = None,
    ) -> None:
        from .._storage import normalise_url

        self.url: str = normalise_url(url)
        #: Set when the store could not be opened: nothing is being recorded.
        self.broken: bool = False
        self.content: ContentMode = content or _settings.record_content()
        # How long finished rows may wait to be sent when fewer than a batch's worth are queued
        # (the loop wakes the thread once a batch's worth is queued). Each time it wakes, it
        # takes the GIL from the event loop: at every 50 ms, a burst of 2,000 runs took 6% longer
        # (measured, with the thread waking two or three times in it).
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.process: bool = _settings.record_in_a_process() if process is None else process
        # Finished spans' rows, one after another, as flat values (ROW_WIDTH a row): a tuple per
        # row would be an object the garbage collector tracks until its next collection, and
        # thousands queued at once made the loop's collections more frequent (measured: 15 more
        # young collections for 18,000 rows). The loop only adds whole rows at the end (one
        # ``extend``, atomic under the GIL) and the writer's thread only takes them from the
        # front (one slice and one ``del``, each atomic too), so neither needs a lock.
        self._rows: list[Any] = []
        # Events and flush markers, in order.
        self._queue: deque[SpanEvent | _FlushMarker] = deque()
        self._wake = threading.Event()
        self._stopping = False
        # Spans given as records (handle), by id, until they finish: their children's totals
        # are added to them, as running code adds them to live spans.
        self._detached: dict[str, Span] = {}
        # Spans that started and have not finished (see span_started), with what their rows
        # need of their start: the model, the inputs, and whether a running row was written.
        self._open_spans: dict[Span, _Started] = {}
        self._open_spans_seen_ns = 0
        self._writer: _Sidecar | StoreWriter | None = None
        # Held by the recorder's thread while it sends, and by hand_off(): after a hand-off,
        # nothing more is sent.
        self._sending = threading.Lock()
        self._handed_off = False
        #: Set once the thread has made its writer (or given up): a hand-off waits for it.
        self._writer_made = threading.Event()
        self._thread = threading.Thread(target=self._run, name=WRITER_THREAD, daemon=True)
        self._thread.start()

    # -- on the event loop ----------------------------------------------------------------

    def span_started(self, span: Span, attributes: dict[str, Any] | None) -> None:
        """List ``span`` as open, with the model and inputs its row will need."""
        if self.broken:  # a store that cannot be opened must not grow the queue forever
            return
        model = inputs = None
        if attributes:
            # What the row needs of the start attributes, taken now: the span does not keep
            # them, and the inputs are recorded as they were when the span started.
            model = attributes.get("model")
            if model is not None and type(model) is not str:
                model = str(model)
            inputs = attributes.get("inputs")
            if inputs is not None:
                # An attempt's inputs sent as text are its one user message (see
                # recorded_messages): inputs given as text by another producer are encoded.
                inputs = recorded(inputs) if span.kind != "llm" else to_json(inputs)
            elif "messages" in attributes:
                inputs = recorded_messages(attributes["messages"])
            else:
                inputs = recorded(attributes.get("arguments"))
        # Open spans are only listed (they are alive anyway): most end within the same batch,
        # and the writer's thread writes a "running" row only for those that don't.
        self._open_spans[span] = [model, inputs, False]

    def span_finished(self, span: Span) -> None:
        """Queue the finished span's row for the writer."""
        if self.broken:
            return
        # Its row, now, as plain values: nothing here keeps the span or its values alive.
        started = self._open_spans.pop(span, None)
        rows = self._rows
        rows.extend(self._row(span, started))
        if len(rows) >= _WAKE_AT and not self._wake.is_set():
            self._wake.set()  # a batch's worth: the thread sends it before its interval is up

    def span_event(self, event: SpanEvent) -> None:
        """Queue an event that happened inside a span for the writer."""
        if not self.broken:
            self._queue.append(event)

    def handle(self, event: Event) -> None:
        """Take a record object (for producers other than Kagura's own instrumentation)."""
        if isinstance(event, SpanStarted):
            span = self._span_of(event)
            self._detached[event.span_id] = span
            self.span_started(span, dict(event.attributes))
        elif isinstance(event, SpanFinished):
            ended = self._detached.pop(event.span_id, None) or self._span_of(event)
            ended.error, ended.error_type = event.error, event.error_type
            close(
                ended,
                event.status,
                None,
                event.usage,
                event.cost_usd,
                dict(event.attributes),
                end_ns=event.end_ns,
            )
            self.span_finished(ended)
        else:
            if event.name == "retry_wait" and event.span_id in self._detached:
                self._detached[event.span_id].retries += 1
            self.span_event(event)

    def _span_of(self, event: SpanStarted | SpanFinished) -> Span:
        parent = self._detached.get(event.parent_id) if event.parent_id else None
        return Span.detached(
            event.kind,
            event.name,
            event.span_id,
            event.parent_id,
            event.run_id,
            event.step_key,
            event.start_ns,
            parent,
        )

    def _row(self, span: Span, started: _Started | None) -> Row:
        """The span's row as the writer takes it (see ``_writer.WIRE_COLUMNS``): only what the
        span holds, as it holds it; the writer derives the rest (times in seconds, duration,
        total tokens, the step key's text). A running span's row has its totals so far and no
        end, cost or result yet. ``started``: what :meth:`span_started` took of its start."""
        status = span.status  # read once: the loop may end the span while its row is built
        running = status == "running"
        result = None if running else span.result
        model, inputs = (None, None) if started is None else (started[0], started[1])
        if not result:
            output = extra = None
        else:
            # Atomic values as they are: the writer process encodes them, off the event loop.
            output, extra = recorded_result(result)
            answered_by = result.get("answered_by")
            if type(answered_by) is str and answered_by != "journal":
                model = answered_by  # a fallback model's answer is that model's, not the first's
            elif model is None:
                model = result.get("model")
                if model is not None and type(model) is not str:
                    model = str(model)
        # Ids as numbers unless someone read them as text (see Span.wire_ids): the writer
        # makes them text.
        span_id, run_id, parent_id = span.wire_ids()
        key, seq = span.wire_step_key()
        # The agent call an LLM attempt or tool call was made for: what the rollups count its
        # cost under when a query asks for one agent's.
        parent = span.parent
        agent = None
        if parent is not None and parent.kind == "agent" and span.kind != "agent":
            agent = parent.name
        return (
            span_id,
            run_id,
            parent_id,
            span.kind,
            span.name,
            key,
            seq,
            status,
            span.start_ns,
            None if running else span.end_ns,
            model,
            span.prompt_tokens,
            span.completion_tokens,
            None if running else span.cost,
            span.llm_calls,
            span.retries,
            span.error,
            span.error_type,
            inputs,
            output,
            extra,
            agent,
        )

    # -- anywhere -------------------------------------------------------------------------

    @property
    def written_spans(self) -> int:
        """Spans written so far (as of the last flush, with a writer process)."""
        return self._writer.written_spans if self._writer is not None else 0

    @property
    def written_events(self) -> int:
        return self._writer.written_events if self._writer is not None else 0

    @property
    def failed_batches(self) -> int:
        return self._writer.failed_batches if self._writer is not None else 0

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything queued so far is written (or ``timeout`` passes)."""
        if not self._thread.is_alive():
            return False
        marker = _FlushMarker()
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout) and not self.broken

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the recorder's thread (``timeout``: seconds to wait
        for each)."""
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def hand_off(self) -> bool:
        """At exit: give the writer process everything queued and return without waiting for
        it to be committed (the writer does so after this process has gone, while readers wait
        for it: see :mod:`._handoff`). ``False`` when there is no writer process to give it to
        (not started, gone, or no lock file where locks are not available): :meth:`close` then
        writes it, waiting."""
        if self._handed_off:  # at exit twice: by multiprocessing's finalizers, then atexit
            return True
        # Starting the writer process takes the thread milliseconds; opening the store takes
        # the process most of a second, which is what is not waited for.
        self._writer_made.wait(5.0)
        sidecar = self._writer
        if self.broken or not isinstance(sidecar, _Sidecar) or sidecar.lock is None:
            return False
        # The thread holds it while it sends a batch (or waits for a flush's commit): a writer
        # that does not keep up makes close() the better way out, with its own time limits.
        if not self._sending.acquire(timeout=5.0):
            return False
        try:
            if self._writer is not sidecar or sidecar.process.poll() is not None:
                return False
            self._handed_off = True
            events: list[Row] = []
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, _FlushMarker):
                    item.done.set()
                else:
                    events.append(_event_row(item))
            finished = self._rows[:]
            del self._rows[:]
            running = self._running_rows(everything=True)
            try:
                sidecar.hand_off(running, finished, events)
            except _SidecarGone:
                _log.error(
                    "kagura: the event store's writer process stopped at exit; %d rows are lost",
                    len(finished) // ROW_WIDTH + len(running) + len(events),
                )
        finally:
            self._sending.release()
        return True

    # -- the recorder's thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._writer = self._open()
            self._writer_made.set()
        except _StoreUnopenable:  # said by this process or by the writer (see wait_opened)
            self._writer_made.set()
            return
        except Exception as exc:
            self._writer_made.set()
            if self._handed_off:  # this process is leaving: the writer process says it
                return
            self._recording_off(exc)
            return
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                with self._sending:
                    if self._handed_off:
                        return
                    self._drain()
                if self._stopping and not self._queue and not self._rows:
                    return
        except _RecordingOff:  # said and done in _fall_back
            return
        finally:
            if self._handed_off:
                pass  # the writer process finishes on its own
            elif isinstance(self._writer, _Sidecar):
                self._writer.close()
            elif self._writer is not None:
                self._writer.dispose()

    def _recording_off(self, why: BaseException) -> None:
        """The store cannot be opened: say so once, and record nothing from now on (the
        application's calls go on as if nothing were recorded)."""
        from .._storage import scrub_url

        if isinstance(why, (StoreError, _StoreUnopenable)):  # they name the store and the cause
            reason = str(why)
        else:  # a bug of ours
            reason = scrub_url(
                f"cannot open the event store: {type(why).__name__}: {why}", self.url
            )
        _log.warning("kagura: recording is off: %s", reason)
        self.broken = True
        self._fail_pending()

    def _say_unopenable(self, why: str) -> bool:
        """The writer process could not open the store: say so here and stop recording, unless
        this process has handed its rows off (it is leaving, and the writer says it)."""
        with self._sending:  # not while a hand-off is under way
            if self._handed_off:
                return False
            self._recording_off(_StoreUnopenable(why))
            return True

    def _open(self) -> _Sidecar | StoreWriter:
        if self.process:
            try:
                # A fork meanwhile would give the child copies of the writer's pipes and lock
                # file that it could not know to let go of (see _forget_default_in_child).
                with _spawning:
                    sidecar = _Sidecar(self.url, self.content)
                    # From here on, a hand-off at exit can give it the rows queued meanwhile.
                    self._writer = sidecar
                self._writer_made.set()
                sidecar.wait_opened(self._say_unopenable)
                return sidecar
            except (_SidecarGone, OSError) as exc:  # could not start it: write from here
                if self._handed_off:
                    raise
                _log.warning("kagura: no writer process (%s); writing from a thread", exc)
        return StoreWriter(self.url, self.content)

    def _fail_pending(self) -> None:
        self._rows.clear()
        self._open_spans.clear()  # spans that finish now are not recorded: nothing keeps them
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _FlushMarker):
                item.done.set()

    def _drain(self) -> None:
        queue, rows = self._queue, self._rows
        batch = self.batch_size * ROW_WIDTH
        while True:
            events: list[Row] = []
            markers: list[_FlushMarker] = []
            while queue and len(events) < self.batch_size:
                item = queue.popleft()
                if isinstance(item, _FlushMarker):
                    markers.append(item)
                    break  # write what came before the marker, then release its waiter
                if isinstance(item, SpanEvent):
                    events.append(_event_row(item))
            try:
                # Whole rows only (each was added in one piece); for a flush marker, every row
                # so far, since all those finished before the flush are among them.
                taken = len(rows) if markers else min(len(rows), batch)
                finished = rows[:taken]
                del rows[:taken]
                # After taking the rows: a span whose row is among them had left _open_spans.
                try:
                    running = self._running_rows(everything=bool(markers))
                    for start in range(0, max(taken, 1), batch):
                        self._write(running, finished[start : start + batch], events)
                        running, events = [], []
                    if markers:
                        self._sync()
                except _RecordingOff:
                    raise
                except Exception:  # a bug of ours must not end recording, nor strand a flush
                    _log.exception(
                        "kagura: recording a batch failed; %d rows are dropped",
                        taken // ROW_WIDTH + len(events),
                    )
            finally:
                for marker in markers:
                    marker.done.set()
            if not queue and len(rows) < batch:
                return

    def _running_rows(self, *, everything: bool) -> list[Row]:
        """ "Running" rows for open spans not written yet: those open for a second or more (most
        spans end sooner, and a row each would double the writer's work), or all of them when
        someone waits for a flush."""
        now = time.time_ns()
        if not everything:
            if now - self._open_spans_seen_ns < _OPEN_SPANS_EVERY_NS:
                return []
            self._open_spans_seen_ns = now
        started_before = now - _RUNNING_AFTER_NS
        rows = []
        # A copy, taken in one step: the event loop's thread adds and removes spans meanwhile,
        # and list(items()) is not one step. A garbage collection while it builds the list can
        # run Python code (finalizers, gc.callbacks), and so let the other thread in: the dict
        # changed size during the iteration, and the batch's rows were dropped.
        for span, started in self._open_spans.copy().items():
            if not started[2] and (everything or span.start_ns < started_before):
                started[2] = True
                rows.append(self._row(span, started))
        return rows

    def _write(self, running: list[Row], finished: list[Any], events: list[Row]) -> None:
        """Write rows: ``finished`` as flat values (see ``_rows``)."""
        writer = self._writer
        assert writer is not None
        if not (running or finished or events):
            return
        if isinstance(writer, _Sidecar):
            try:
                writer.write(running, finished, events)
                return
            except _SidecarGone as exc:
                self._fall_back(exc)
                writer = self._writer
        assert isinstance(writer, StoreWriter)
        writer.write(running, rows_of(finished), events)

    def _sync(self) -> None:
        writer = self._writer
        if isinstance(writer, _Sidecar):
            try:
                writer.sync()
            except _SidecarGone as exc:
                self._fall_back(exc)

    def _fall_back(self, why: Exception) -> None:
        """The writer process died: write from this thread from now on. (What it had read but
        not committed is lost; everything after is not.) Raises ``_RecordingOff`` when this
        thread cannot open the store either."""
        _log.error(
            "kagura: the event store's writer process stopped (%s); writing from a thread", why
        )
        gone = self._writer
        try:
            writer = StoreWriter(self.url, self.content)
        except StoreError as error:
            self._writer = None
            if isinstance(gone, _Sidecar):
                gone.close(timeout=1.0)
            # Before the flushes waiting are released: they learn that nothing was written.
            self._recording_off(error)
            raise _RecordingOff from error
        self._writer = writer
        if isinstance(gone, _Sidecar):
            writer.written_spans = gone.written_spans
            writer.written_events = gone.written_events
            writer.failed_batches = gone.failed_batches
            gone.close(timeout=1.0)


def _event_row(event: SpanEvent) -> Row:
    return (event.span_id, event.run_id, event.name, event.time_ns / 1e9, to_text(event.attributes))


# -- the process-wide default recorder ----------------------------------------------------

_default: Recorder | None = None
_default_lock = threading.Lock()


def default_recorder() -> Recorder | None:
    """The recorder :func:`install_default` started, or ``None`` if none was."""
    return _default


def install_default() -> Recorder:
    """Start recording to the default store (``KAGURA_DB`` or ``KAGURA_HOME/events.db``)."""
    global _default
    from .._instrument import add_sink
    from .._storage import default_url

    with _default_lock:
        if _default is None:
            _default = Recorder(default_url())
            add_sink(_default)
            atexit.register(_close_default)
            if "multiprocessing" in sys.modules:
                # A multiprocessing child started by fork leaves through os._exit, which skips
                # atexit; multiprocessing runs its own finalizers first.
                from multiprocessing import util

                util.Finalize(None, _close_default, exitpriority=10)
        return _default


def _close_default() -> None:
    recorder = _default
    if recorder is not None:
        started = time.monotonic()
        if recorder.hand_off():
            _log.debug("kagura: recorder handed off in %.3fs", time.monotonic() - started)
            return
        recorder.close(timeout=30.0)
        _log.debug("kagura: recorder flushed in %.3fs", time.monotonic() - started)


def _forget_default_in_child() -> None:
    """A forked child has the default recorder's state but not its thread (threads do not
    survive fork) and shares its writer's pipe: it starts a recorder of its own instead, on its
    first call. It lets go of its copies of the writer's pipe and lock file: while a child held
    them, the writer would wait for more rows, and readers for the writer, until the child
    ended."""
    global _default, _default_lock
    from .. import _instrument

    if _default is not None:
        _instrument.remove_sink(_default)
        if isinstance(_default._writer, _Sidecar):
            _default._writer.forget_in_child()
        _default = None
    _default_lock = threading.Lock()
    _instrument.reset_recording_check()


#: Held while a writer process is started, and across a fork: a child is forked either before
#: the writer's pipes exist or after the recorder knows them. Reentrant: the thread starting
#: the writer forks too (with no hooks run, unless subprocess is given a preexec_fn).
_spawning = threading.RLock()


def _before_fork() -> None:
    _spawning.acquire()


def _after_fork_in_parent() -> None:
    _spawning.release()


def _after_fork_in_child() -> None:
    global _spawning
    _spawning = threading.RLock()
    _forget_default_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def uninstall_default() -> None:
    """Flush and stop the default recorder (tests; or to switch stores)."""
    global _default
    from .._instrument import remove_sink

    with _default_lock:
        if _default is not None:
            remove_sink(_default)
            _default.close()
            _default = None
