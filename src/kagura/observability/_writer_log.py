"""Where the writer process's warnings go: the recording process's stderr, or a log file.

The writer process (:mod:`._writer`) says on stderr what goes wrong with the store: that it
cannot be opened, or written. Inheriting the recording process's stderr is right for a terminal
or a file, but not for a pipe: whoever reads a pipe (``subprocess.run(capture_output=True)``, a
CI runner, a tool running a script) sees the end of the output only once every process holding
it has closed it. A script hands its last rows to its writer at exit (see :mod:`._handoff`)
precisely so as not to wait for the writer's start-up and commit, and with the pipe inherited its
caller waited for them all the same (0.5 to 0.7 s for a script of one agent call).

So where this process's stderr is a pipe or a socket, the writer gets a pipe of its own, which a
thread of the recording process copies to its stderr (:class:`StderrRelay`) until the process
hands its rows off at exit. Once nobody reads that pipe, the writer's warnings go to the file
``recorder.log`` under ``KAGURA_HOME`` instead (:class:`WarningsHandler`), each line naming the
time and both processes. Where stderr is a terminal or a file, the writer inherits it and says
everything there, after its recording process has gone too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import stat
import threading
import time
from typing import IO, TextIO

#: Under KAGURA_HOME: what writer processes could not say on their recording process's stderr.
LOG_NAME = "recorder.log"


def relayed() -> bool:
    """Whether a writer started now gets a relayed stderr (this process's is a pipe or a socket)
    rather than this process's own."""
    if os.name != "posix":  # no lock files there either: the recording process waits at exit
        return False
    try:
        mode = os.fstat(2).st_mode
    except OSError:  # no stderr at all: the writer inherits none either
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class StderrRelay:
    """Copies what the writer process writes on ``source`` (the pipe that is its stderr) to this
    process's stderr, from a thread, until :meth:`stop`."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._fd = source.fileno()
        os.set_blocking(self._fd, False)
        self._stop_read, self._stop_write = os.pipe()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kagura-writer-stderr", daemon=True)
        self._thread.start()

    def fds(self) -> list[int]:
        """The descriptors it holds (a forked child lets go of its copies)."""
        return [self._fd, self._stop_read, self._stop_write]

    def stop(self) -> None:
        """Copy what the writer has written so far and let go of the pipe: from then on the
        writer's writes fail, and it says what it has to say in the log file. (Once: a hand-off
        stops it, and so does closing the writer's pipes after.)"""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):
            os.write(self._stop_write, b"x")
        # It only waits for this process's stderr, which the whole process would wait for.
        self._thread.join(5.0)
        if self._thread.is_alive():
            return
        self._source.close()
        os.close(self._stop_read)
        os.close(self._stop_write)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._fd, selectors.EVENT_READ)
            selector.register(self._stop_read, selectors.EVENT_READ)
            while True:
                ready = {key.fd for key, _ in selector.select()}
                if self._fd in ready and not self._copy():
                    return  # the writer has ended
                if self._stop_read in ready:
                    self._copy()
                    return

    def _copy(self) -> bool:
        """Copy what can be read now; ``False`` at the end of the pipe."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            with contextlib.suppress(OSError):  # this process's stderr is gone: nowhere to say it
                _write_all(2, data)


class WarningsHandler(logging.Handler):
    """The writer process's logging handler: stderr, then ``KAGURA_HOME/recorder.log`` for good
    once writing to stderr fails (the relayed pipe let go of, or a closed terminal)."""

    def __init__(self, recording_pid: int | None = None) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))
        # The recording process, as it said; else the parent, read now: once the recording
        # process has gone, the writer's parent is another one.
        self._recording_pid = os.getppid() if recording_pid is None else recording_pid
        self._file: TextIO | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self._file is None:
            try:
                _write_all(2, f"{text}\n".encode(errors="replace"))
                return
            except OSError:
                pass
        with contextlib.suppress(OSError):  # no log file either: nowhere left to say it
            log = self._log_file()
            log.write(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} writer process {os.getpid()} "
                f"(recording for process {self._recording_pid}): {text}\n"
            )
            log.flush()

    def _log_file(self) -> TextIO:
        if self._file is None:
            from .. import _settings

            home = _settings.kagura_home()
            home.mkdir(parents=True, exist_ok=True)
            self._file = (home / LOG_NAME).open("a", encoding="utf-8")
        return self._file


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
