"""Writer processes that outlive the process they record for, and readers that wait for them.

At exit, a recording process hands what it has queued to its writer process and leaves without
waiting for it to be committed: in a short script the wait is the writer's start-up (an
interpreter importing SQLAlchemy and opening the store), most of the script's time. So that no
reader sees the store without those rows, every writer process has a lock file,
``.<store>.writers/<pid>-<n>.lock`` next to a SQLite store (``KAGURA_HOME/writers/<hash>/`` for
other databases). The recording process opens it and the writer process inherits it; at the
hand-off the recording process locks it (``flock``, exclusive). The lock belongs to the open
file the two processes share, so it outlives the recording process and ends when the writer,
everything committed, removes the file and exits, or dies. A reader first takes each lock shared,
which waits for the writers still at work (:func:`wait_for_writers`).

POSIX only (``fcntl``): elsewhere a recording process waits for its writer at exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import time
from pathlib import Path

from .. import _settings

_log = logging.getLogger("kagura.recorder")

_SQLITE_PREFIX = "sqlite:///"
_numbers = itertools.count(1)
#: How long a reader waits for a writer still at work before it reads anyway (saying so).
_READER_PATIENCE = 60.0


def lock_directory(url: str) -> Path:
    """Where the lock files of writers to ``url`` are."""
    if url.startswith(_SQLITE_PREFIX) and "?" not in url:
        path = url[len(_SQLITE_PREFIX) :]
        if path and path != ":memory:":
            store = Path(path)
            return store.parent / f".{store.name}.writers"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return _settings.kagura_home() / "writers" / digest


class WriterLock:
    """The lock file of one writer process, held by its recording process until it starts it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def create(cls, url: str) -> WriterLock | None:
        """A new lock file for a writer to ``url`` (``None`` where locks are not available: the
        recording process then waits for its writer at exit)."""
        try:
            import fcntl  # noqa: F401 - POSIX only
        except ImportError:
            return None
        directory = lock_directory(url)
        path = directory / f"{os.getpid()}-{next(_numbers)}.lock"
        for _ in range(2):  # a second time if the directory went meanwhile
            try:
                directory.mkdir(parents=True, exist_ok=True)
                _forget_the_dead(directory)
                fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
                return cls(path, fd)
            except FileNotFoundError:  # the last writer removed the directory meanwhile
                continue
            except OSError as exc:
                _log.debug("kagura: no writer lock in %s (%s)", directory, exc)
                return None
        return None

    def hold(self) -> None:
        """Lock it: from now on readers wait until the writer process lets it go."""
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def close(self) -> None:
        """The writer has ended (waited for): the file goes."""
        let_go(str(self.path))
        with contextlib.suppress(OSError):
            os.close(self.fd)


def let_go(path: str) -> None:
    """In the writer process, everything committed: the lock file goes (the lock itself ends
    with the process), and its directory with the last one, so that a store that nobody
    writes to is its file alone."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):  # not empty: other writers are at work
        os.rmdir(os.path.dirname(path))


def wait_for_writers(url: str) -> None:
    """Wait until every writer process that was handed rows for ``url`` has committed them."""
    try:
        import fcntl
    except ImportError:
        return
    directory = lock_directory(url)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    deadline = time.monotonic() + _READER_PATIENCE
    for name in names:
        try:
            fd = os.open(directory / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # gone meanwhile: its writer has finished
            continue
        try:
            # flock has no timeout: try, and try again, until the deadline.
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        _log.warning(
                            "kagura: a writer process of the event store is still at work "
                            "after %.0f s (%s); reading without what it has not written",
                            _READER_PATIENCE,
                            directory / name,
                        )
                        return
                    time.sleep(0.01)
        finally:
            os.close(fd)


def _forget_the_dead(directory: Path) -> None:
    """Lock files left by writers that died before removing them (not locked, and their
    recording process gone): harmless, but they would pile up."""
    import fcntl

    for name in os.listdir(directory):
        pid_text = name.split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer at work holds it
            path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True
