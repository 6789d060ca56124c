"""Shared fixtures. Keep this small: only what several test modules need."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from . import _llamacpp

# The kagura.ray tests start a Ray cluster, which must be in a private network namespace:
# tests/test_ray.py runs them there, in a pytest of their own that sets KAGURA_RAY_TESTS.
collect_ignore = [] if os.environ.get("KAGURA_RAY_TESTS") else ["cluster"]


def pytest_configure(config: pytest.Config) -> None:
    # Recordings of the test run go to a throwaway KAGURA_HOME, never to the developer's
    # ~/.kagura; and a developer's real OpenAI key must not turn tests into paid calls.
    global _SESSION_HOME
    home = _SESSION_HOME = tempfile.mkdtemp(prefix="kagura-test-home-")
    os.environ["KAGURA_HOME"] = home
    os.environ.pop("KAGURA_DB", None)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENROUTER_API_KEY"):
        os.environ.pop(name, None)


@functools.cache
def _embedded_model_missing() -> str | None:
    """Why the embedded model cannot run here (the [local] extra is missing), or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed: pip install -e '.[local]'"
    from kagura.errors import UsageError
    from kagura.providers.local import find_gguf

    try:
        find_gguf()
    except UsageError as exc:
        return str(exc)
    return None


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The llama.cpp server runs the embedded model, so a test that uses it needs the model too.
    for item in items:
        if "llamacpp_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.local_model)


#: The session's KAGURA_HOME (see pytest_configure).
_SESSION_HOME = ""
#: How far into the writer processes' log a test started.
_WRITER_LOG_AT = pytest.StashKey[int]()


def _writer_log() -> Path:
    """Where writer processes log once their recording processes have gone (see
    kagura.observability._writer_log), in the session's KAGURA_HOME."""
    from kagura.observability._writer_log import LOG_NAME

    return Path(_SESSION_HOME, LOG_NAME)


def _writer_log_size() -> int:
    try:
        return _writer_log().stat().st_size
    except OSError:
        return 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report shows what writer processes logged meanwhile: a writer that
    outlives its recording process (it was handed the rows at exit) can say why rows are missing
    nowhere else. (CI's one failure of the forked-child test was explained by that file alone.)"""
    report = yield
    if report.when == "call" and report.failed:
        start = item.stash.get(_WRITER_LOG_AT, 0)
        if _writer_log_size() > start:
            with _writer_log().open(errors="replace") as log:
                log.seek(start)
                report.sections.append(("writer processes' log (recorder.log)", log.read()))
    return report


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_WRITER_LOG_AT] = _writer_log_size()
    # A test marked local_model is skipped without the [local] extra (an error in CI, where it
    # must run), rather than failing somewhere inside the provider.
    if item.get_closest_marker("local_model") is not None:
        reason = _embedded_model_missing()
        if reason is None:
            return
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"local_model tests must run in CI, but {reason}", pytrace=False)
        pytest.skip(reason)


class JumpingClock:
    """``time.monotonic``, which the event loop's clock reads too, able to jump forward: time
    passes without being waited for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = time.monotonic
        self.ahead = 0.0
        monkeypatch.setattr(time, "monotonic", lambda: real() + self.ahead)

    def jump(self, seconds: float) -> None:
        """Move the clock on; timers due by then run when the loop next looks at them."""
        self.ahead += seconds

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` pass at once. Every timer due by then runs before this returns, in
        order of deadline: a timeout that expired meanwhile cancels the caller here."""
        self.ahead += seconds
        loop = asyncio.get_running_loop()
        passed = loop.create_future()
        loop.call_at(loop.time(), _resolve, passed)
        await passed


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # cancelled by a timeout that fired first
        future.set_result(None)


@pytest.fixture
def jumping_clock(monkeypatch: pytest.MonkeyPatch) -> JumpingClock:
    return JumpingClock(monkeypatch)


@pytest.fixture(autouse=True)
def _isolated_model_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their model explicitly; the developer's shell settings must not leak in.

    ``KAGURA_MODEL_OVERRIDE`` would beat even ``model=FakeModel(...)``, so it is always cleared;
    so is ``KAGURA_ENCRYPTION_KEY``: tests that read stored values as they are set it themselves.
    """
    monkeypatch.delenv("KAGURA_MODEL_OVERRIDE", raising=False)
    monkeypatch.delenv("KAGURA_MODEL", raising=False)
    monkeypatch.delenv("KAGURA_ENCRYPTION_KEY", raising=False)
    # A proxy configured in the environment must not capture requests meant for 127.0.0.1.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_llamacpp.LlamaCppServer]:
    """``python -m llama_cpp.server`` on the embedded model, for the session (see _llamacpp.py).

    ``.alive()`` tells whether it still runs and answers; it is not restarted if a test kills it.
    """
    model = _llamacpp.gguf_or_skip()
    try:
        server = _llamacpp.start_server(model, tmp_path_factory.mktemp("llamacpp"))
    except _llamacpp.ServerFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
