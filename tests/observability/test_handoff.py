"""Writer processes that outlive the process they record for, and the lock files readers wait on
(``kagura/observability/_handoff.py``). The hand-off itself, a process leaving while its stopped
writer still holds its rows, is in test_recorder.py."""

from __future__ import annotations

import fcntl
import marshal
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kagura._storage import normalise_url
from kagura.observability._handoff import WriterLock, lock_directory, wait_for_writers
from kagura.observability._writer import _Replies, receive, refuse, send
from kagura.observability._writer_log import LOG_NAME, StderrRelay

from .conftest import child_env, free_port, rows

ONE_CALL = """
import asyncio
from kagura import agent

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

print(asyncio.run(summarise("x")))
"""


def _a_dead_pid() -> int:
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(process.stdout)


def test_lock_files_of_dead_writers_go_and_those_held_stay(tmp_path: Path) -> None:
    url = normalise_url(tmp_path / "events.db")
    directory = lock_directory(url)
    assert directory == tmp_path / ".events.db.writers"  # hidden: `events.db*` is the store's
    directory.mkdir()
    dead = _a_dead_pid()
    (directory / f"{dead}-1.lock").touch()  # its writer died before removing it
    held = directory / f"{dead}-2.lock"
    held.touch()
    with held.open() as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # a writer at work after its process has gone
        lock = WriterLock.create(url)
        assert lock is not None
        assert sorted(p.name for p in directory.iterdir()) == sorted([held.name, lock.path.name])
        with lock.path.open() as other:
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # not held until the hand-off
    lock.close()
    held.unlink()
    wait_for_writers(url)  # nothing to wait for
    assert not lock.path.exists()


def test_readers_go_on_when_no_writer_ever_handed_anything_off(tmp_path: Path) -> None:
    url = normalise_url(tmp_path / "events.db")
    wait_for_writers(url)  # no directory at all
    assert not lock_directory(url).exists()


def test_a_store_that_cannot_be_opened_after_the_process_left_is_still_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at the store's address: the process hands off at exit, before its writer
    has even tried, so the writer process says that what it was given is dropped, on the same
    stderr (a file here, as a terminal would be: nobody waits for its end)."""
    monkeypatch.setenv("KAGURA_HOME", str(tmp_path))
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing_listens_here"
    with (tmp_path / "stderr").open("w+") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", ONE_CALL],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=120,
            env=child_env({"KAGURA_DB": url, "KAGURA_MODEL": "fake"}),
            check=False,
        )
        wait_for_writers(normalise_url(url))
        stderr.seek(0)
        said = stderr.read()
    assert done.returncode == 0, said
    assert done.stdout.strip() == "Summarise: x"
    # A server not there yet is tried again (see StoreWriter), and said once.
    assert said.count(f"event store {url}: cannot open: ") == 1, said
    assert said.count("recordings are dropped until it can be written") == 1, said
    assert "Traceback" not in said
    assert not (tmp_path / LOG_NAME).exists()


def test_a_captured_script_ends_before_its_writer_which_says_the_rest_in_a_log_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever reads a script's stderr through a pipe sees its end when the script exits, not
    when the writer it handed its rows to does: here the writer cannot finish at all until the
    test lets it (the store's address accepts connections and never answers). What the writer
    has to say after that goes to KAGURA_HOME/recorder.log, nobody being left to read the pipe."""
    monkeypatch.setenv("KAGURA_HOME", str(tmp_path))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accepts: a connection waits in the backlog for an answer
        port = listener.getsockname()[1]
        url = f"postgresql://postgres@127.0.0.1:{port}/never_answers"
        script = subprocess.Popen(
            [sys.executable, "-c", ONE_CALL],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env({"KAGURA_DB": url, "KAGURA_MODEL": "fake"}),
        )
        stdout, stderr = script.communicate(timeout=120)
        assert script.returncode == 0, stderr
        assert stdout.strip() == "Summarise: x"
        assert stderr == ""
        # The writer is still at work, holding its lock file (readers wait for it).
        locks = list(lock_directory(normalise_url(url)).glob("*.lock"))
        assert len(locks) == 1
        with locks[0].open() as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    # The listener closed: the connection waiting in its backlog is reset, the writer fails.
    wait_for_writers(normalise_url(url))
    said = (tmp_path / LOG_NAME).read_text()
    assert said.count("recordings are dropped until it can be written") == 1, said
    assert said.count("\n") == 1 and "writer process " in said, said
    # The script that recorded, gone by then: not the process that adopted the writer.
    assert f"(recording for process {script.pid})" in said, said
    assert "Traceback" not in said


def test_the_writer_s_stderr_is_relayed_until_the_hand_off(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A writer started with a pipe for its stderr: what it writes there reaches this process's
    stderr, and once the relay stops, its writes fail (it then turns to the log file)."""
    child = subprocess.Popen(
        [sys.executable, "-c", WRITES_TO_STDERR],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    relay = StderrRelay(child.stderr)
    try:
        assert child.stdout.readline() == b"said\n"
        relay.stop()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"broken pipe\n"
    finally:
        child.stdin.close()
        child.wait(60)
        child.stdout.close()
    assert capfd.readouterr().err == "a warning from the writer\n"


WRITES_TO_STDERR = """
import os, sys
os.write(2, b"a warning from the writer\\n")
print("said", flush=True)
sys.stdin.readline()
try:
    os.write(2, b"too late\\n")
    print("written", flush=True)
except BrokenPipeError:
    print("broken pipe", flush=True)
"""


@pytest.mark.parametrize("answer", [[("said",)], [("rows", [], [], [])], []])
def test_a_store_that_cannot_be_opened_is_said_by_the_writer_only_if_nobody_else_did(
    answer: list[tuple[object, ...]], caplog: pytest.LogCaptureFixture
) -> None:
    """The writer tells the recording process, which says it and answers "said", unless it is
    leaving: it has handed its last rows off (and closed the pipe) or gone. The writer waits to
    know which, so that the store's refusal is said once, whenever the process leaves."""
    to_writer_r, to_writer_w = os.pipe()
    from_writer_r, from_writer_w = os.pipe()
    with (
        os.fdopen(to_writer_r, "rb") as inbox,
        os.fdopen(from_writer_w, "wb", buffering=0) as outbox,
        os.fdopen(from_writer_r, "rb") as replies,
    ):
        with os.fdopen(to_writer_w, "wb", buffering=0) as recording_process:
            for message in answer:
                send(recording_process, marshal.dumps(message))
        refuse(_Replies(outbox), inbox, "event store x: cannot open: no")
        assert receive(replies) == ("opened", False, "event store x: cannot open: no")
    said = [r.getMessage() for r in caplog.records if "recording is off" in r.getMessage()]
    assert said == (
        []
        if answer == [("said",)]
        else ["kagura: recording is off: event store x: cannot open: no"]
    )


FORKS_AND_LEAVES = """
import asyncio, os, sys
from kagura import agent

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

asyncio.run(summarise("before the fork"))
child = os.fork()
if child == 0:  # outlives its parent, until the test closes its stdin
    sys.stdin.read()
    os._exit(0)
print(child, flush=True)
"""


def test_a_forked_child_that_outlives_its_parent_keeps_no_writer_waiting(
    store_url: str, tmp_path: Path
) -> None:
    """The child would hold the writer's pipe (the writer would wait for more rows) and its lock
    file (readers would wait for the writer) for as long as it lives: it lets go of both. (A fork
    while the writer process was being started used to give the child the pipe through which
    subprocess learns that the writer started: the parent then waited for it, at exit, for as
    long as the child lived. Forks now wait for the start.)"""
    with (tmp_path / "stderr").open("w+") as stderr:
        script = subprocess.Popen(
            [sys.executable, "-c", FORKS_AND_LEAVES],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_env({"KAGURA_DB": store_url, "KAGURA_MODEL": "fake"}),
        )
        assert script.stdin is not None and script.stdout is not None
        try:
            child = int(script.stdout.readline())
            try:
                returncode = script.wait(timeout=60)
            except subprocess.TimeoutExpired:
                returncode = None
            stderr.seek(0)
            assert returncode == 0, stderr.read()
            spans = rows(store_url)  # waits for the writer, which has nothing more to wait for
            assert [s["kind"] for s in spans].count("agent") == 1
            assert not any(lock_directory(normalise_url(store_url)).glob("*.lock"))
            os.kill(child, 0)  # still alive all along
        finally:
            script.stdin.close()  # the child ends
            script.stdout.close()
