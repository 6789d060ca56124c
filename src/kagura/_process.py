"""Which OS process wrote a row, and whether that process is still alive.

Durable runs and recorded spans name the process that executes them: host, pid, and the pid's
*start*, a text that tells this process apart from a later one given the same pid (on Linux, the
boot id and the process's start time in clock ticks, from ``/proc``). On the host that wrote it, a
reader can then tell at once that a process is gone (no such pid, or the pid now belongs to
another process, or the machine has rebooted since) instead of waiting for a lease to run out.
About other hosts nothing can be known from here: :func:`is_gone` answers ``False`` for them.

``/proc`` is read directly rather than through psutil: it is three lines on Linux, and psutil
would be a compiled dependency for them. Elsewhere, a pid that no longer exists is still detected
(``os.kill(pid, 0)``); a reused pid is not.
"""

from __future__ import annotations

import functools
import os
import socket

__all__ = ["HOST", "is_gone", "pid_start", "this_process"]

#: This machine's name, as runs and spans record it.
HOST = socket.gethostname()


@functools.cache
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            return file.read().strip() or None
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """The process's start time since boot, in clock ticks (``/proc/PID/stat``, field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def pid_start(pid: int | None = None) -> str | None:
    """``boot-id:start-ticks`` of process ``pid`` (default: this one), or ``None`` where that
    cannot be read (not Linux, or no such process)."""
    boot = _boot_id()
    if boot is None:
        return None
    ticks = _start_ticks(os.getpid() if pid is None else pid)
    return None if ticks is None else f"{boot}:{ticks}"


def is_gone(host: str | None, pid: int | None, start: str | None) -> bool:
    """Is the process that recorded ``host``, ``pid`` and ``start`` known to be gone? Only a
    process of this host can be known gone; ``False`` means alive or unknown."""
    if host != HOST or pid is None or pid <= 0:
        return False
    boot = _boot_id()
    if start is not None and boot is not None:
        recorded_boot, _, ticks = start.partition(":")
        if recorded_boot != boot:
            return True  # the machine has restarted since: every process of then is gone
        return _start_ticks(pid) != ticks  # none, or another process with that pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's, say)
        return False
    return False


_this: tuple[int, str, str | None] | None = None


def this_process() -> tuple[int, str, str | None]:
    """This process as recordings name it: its pid, host and pid start (read once per pid: a
    forked child is another process)."""
    global _this
    pid = os.getpid()
    if _this is None or _this[0] != pid:
        _this = (pid, HOST, pid_start(pid))
    return _this
