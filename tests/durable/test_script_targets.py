"""Loading a run's workflow never runs the script that defines it.

``kagura runs resume`` (and ``replay``) import the file or module a run's target names. A script
whose top level calls ``asyncio.run(main())`` without an ``if __name__ == "__main__":`` guard
would start itself again, as a new run: such a file is refused before any of it runs (a static
check of its source), and work started by code the check cannot see (a helper of another module)
is refused while the import is in progress (the dynamic guard).

The workflows live in files written into ``tmp_path``; each writes what runs of it into a ledger
file, so that a test can tell exactly which of its code ran.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kagura.durable._script as _script
from kagura.cli import main as cli_main
from kagura.durable import Journal, _execute
from kagura.durable._execute import import_target
from kagura.errors import UsageError
from kagura.testing import replay

from .conftest import lines

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
TIMEOUT = 60.0

# The part of every workflow file before its main code: a durable workflow whose one step fails
# while the flag file exists, and a ledger of what ran.
HEAD = """
import asyncio
import os

import kagura
from kagura import workflow


def note(line: str) -> None:
    with open(LEDGER, "a", encoding="utf-8") as file:
        file.write(line + "\\n")


note("imported")


def publish(topic: str) -> str:
    if os.path.exists(FLAG):
        raise RuntimeError(f"publishing {topic} failed: the CMS is down")
    note(f"published {topic}")
    return f"published {topic}"


@workflow(durable=True)
async def report(topic: str) -> str:
    return await kagura.step("publish", publish, topic)


async def main() -> None:
    note("main")
    print(await report.run("tides"))  # a new run id each time, as a script's main code does

"""

TAIL = '\n\nnote("loaded")\n'


@dataclass
class Files:
    """Where this test's workflow files write, and where they are written."""

    root: Path
    ledger: Path
    flag: Path

    def source(self, main_code: str) -> str:
        constants = f"LEDGER = {str(self.ledger)!r}\nFLAG = {str(self.flag)!r}\n"
        return constants + HEAD + textwrap.dedent(main_code).strip() + TAIL

    def script(self, main_code: str, name: str = "report_script.py") -> Path:
        """A workflow file ending with ``main_code``; its absolute path, as targets name it."""
        path = self.root / name
        path.write_text(self.source(main_code), encoding="utf-8")
        return path.resolve()

    def ledger_lines(self) -> list[str]:
        return lines(self.ledger)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Files]:
    yield Files(tmp_path, tmp_path / "ledger.txt", tmp_path / "flag")
    # import_target runs a file under this name; modules written by tests have unique names.
    sys.modules.pop("kagura_resumed_main", None)


def failed_run(journal: Journal, target: str) -> str:
    """A run of ``report('tides')`` recorded as failed, as if its process had run it: resumable."""
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    owner = uuid.uuid4().hex
    outcome, _ = journal.start(run_id, "report", target, '{"topic":"tides"}', owner)
    assert outcome == "started"
    journal.finish(run_id, owner, error=RuntimeError("publishing tides failed: the CMS is down"))
    return run_id


def run_ids(journal: Journal) -> list[str]:
    return [record.run_id for record in journal.list_runs()]


def line_of(path: Path, text: str) -> int:
    """The number of the first line of ``path`` that starts with ``text``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(text):
            return number
    raise AssertionError(f"{text!r} is not in {path}")


# -- the static check: refused before anything of the file runs --------------------------------

# The main code, the call reported, and how the reported line starts.
REFUSED = [
    pytest.param("asyncio.run(main())", "asyncio.run(main())", "asyncio.run", id="asyncio.run"),
    pytest.param(
        "from asyncio import run\nrun(main())", "run(main())", "run(", id="from-asyncio-import-run"
    ),
    pytest.param(
        "import asyncio as aio\nresult = aio.run(main())", "aio.run(main())", "result", id="alias"
    ),
    pytest.param(
        "with asyncio.Runner() as runner:\n    runner.run(main())",
        "asyncio.Runner()",
        "with",
        id="Runner",
    ),
    pytest.param(
        "loop = asyncio.new_event_loop()\nloop.run_until_complete(main())",
        "loop.run_until_complete(main())",
        "loop.run",
        id="run_until_complete",
    ),
    pytest.param(
        "def cli() -> None:\n    asyncio.run(main())\n\n\ncli()",
        "cli(), which calls asyncio.run(main()) at line",
        "cli()",
        id="a-function-of-the-file",
    ),
    pytest.param(
        "try:\n    asyncio.run(main())\nexcept KeyboardInterrupt:\n    pass",
        "asyncio.run(main())",
        "    asyncio.run",
        id="in-try",
    ),
]


@pytest.mark.parametrize(("main_code", "found", "at"), REFUSED)
def test_a_script_that_starts_a_loop_on_import_is_refused_and_nothing_of_it_runs(
    journal: Journal, files: Files, main_code: str, found: str, at: str
) -> None:
    script = files.script(main_code)
    run_id = failed_run(journal, f"{script}:report")

    with pytest.raises(UsageError) as refused:
        import_target(f"{script}:report")

    message = str(refused.value)
    assert f"cannot load workflow 'report' from {script}: its top-level code starts" in message
    assert f"  {script}:{line_of(script, at)}: {found}" in message
    assert "the script would start again, as a new run" in message
    assert "Nothing of this file has run." in message
    # What to change, with the whole module-level statement shown under the guard.
    statement = textwrap.indent(textwrap.dedent(main_code).strip().splitlines()[-1], " " * 8)
    assert 'under `if __name__ == "__main__":`' in message
    assert '    if __name__ == "__main__":\n' in message and statement in message
    assert message.endswith("then resume the run again.")
    # Nothing of the file ran, not even the lines before the call; no run was started.
    assert files.ledger_lines() == []
    assert run_ids(journal) == [run_id]


def test_the_message_shows_the_script_how_it_should_be(journal: Journal, files: Files) -> None:
    script = files.script("asyncio.run(main())")
    with pytest.raises(UsageError) as refused:
        import_target(f"{script}:report")
    line = line_of(script, "asyncio.run(main())")
    assert str(refused.value).endswith(
        f"  {script}:{line}: asyncio.run(main())\n"
        "To resume (or replay) a run, kagura imports the file, and importing runs its top-level "
        "code: the script would start again, as a new run, while the old one is resumed. "
        "Nothing of this file has run.\n"
        'Move that statement under `if __name__ == "__main__":`, which runs only when the file '
        "is run as a script, not when it is imported:\n"
        "\n"
        '    if __name__ == "__main__":\n'
        "        asyncio.run(main())\n"
        "\n"
        "then resume the run again."
    )


async def test_replay_refuses_such_a_script_too(journal: Journal, files: Files) -> None:
    script = files.script("asyncio.run(main())")
    run_id = failed_run(journal, f"{script}:report")
    with pytest.raises(UsageError, match="its top-level code starts an event loop"):
        await replay(run_id)
    assert files.ledger_lines() == []
    assert run_ids(journal) == [run_id]


# -- what is fine: guarded main code, and loops started by code that does not run on import ------

GUARDED = [
    pytest.param('if __name__ == "__main__":\n    asyncio.run(main())', id="guarded"),
    pytest.param('if "__main__" == __name__:\n    asyncio.run(main())', id="reversed-guard"),
    pytest.param(
        """
        import sys
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            asyncio.run(main())


        def cli() -> None:
            asyncio.run(main())


        class Command:
            def handle(self) -> None:
                asyncio.run(main())

            start = staticmethod(lambda: asyncio.run(main()))


        later = lambda: asyncio.run(main())  # noqa: E731


        async def amain() -> None:
            asyncio.run(main())


        amain  # noqa: B018 (named, not called)

        if __name__ == "__main__" and len(sys.argv) > 1:
            cli()
        """,
        id="in-functions-classes-lambdas-type-checking",
    ),
]


@pytest.mark.parametrize("main_code", GUARDED)
def test_a_script_whose_main_code_is_guarded_resumes(
    journal: Journal, files: Files, main_code: str
) -> None:
    script = files.script(main_code)
    run_id = failed_run(journal, f"{script}:report")

    workflow = import_target(f"{script}:report")
    assert files.ledger_lines() == ["imported", "loaded"]  # its top level ran, its main did not

    assert asyncio.run(workflow.resume(run_id)) == "published tides"
    assert files.ledger_lines() == ["imported", "loaded", "published tides"]
    record = journal.get_run(run_id)
    assert record is not None and (record.status, record.attempts) == ("completed", 2)
    assert run_ids(journal) == [run_id]


def test_recover_imports_a_script_once_for_all_its_runs(journal: Journal, files: Files) -> None:
    """Importing a script runs its top level: recovering three of its runs does that once, not
    once per run."""
    script = files.script('if __name__ == "__main__":\n    asyncio.run(main())')
    started = []
    for _ in range(3):
        run_id, owner = f"run-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        outcome, _ = journal.start(run_id, "report", f"{script}:report", '{"topic":"tides"}', owner)
        assert outcome == "started"
        journal.release(run_id, owner)  # as if its process had died: interrupted
        started.append(run_id)

    recovered = asyncio.run(_execute.recover())
    assert sorted((r.run_id, r.outcome) for r in recovered) == [
        (run_id, "completed") for run_id in sorted(started)
    ]
    assert files.ledger_lines() == ["imported", "loaded"] + ["published tides"] * 3


def test_recover_leaves_runs_whose_workflow_cannot_be_loaded_interrupted(journal: Journal) -> None:
    module = f"kagura_no_such_module_{uuid.uuid4().hex[:8]}"
    targets = {"run-a": f"{module}:report", "run-b": f"{module}:report", "run-c": None}
    for run_id, target in targets.items():
        owner = uuid.uuid4().hex
        outcome, _ = journal.start(run_id, "report", target, '{"topic":"tides"}', owner)
        assert outcome == "started"
        journal.release(run_id, owner)

    recovered = {r.run_id: r for r in asyncio.run(_execute.recover())}
    assert {run_id: r.outcome for run_id, r in recovered.items()} == dict.fromkeys(
        targets, "unloadable"
    )
    assert isinstance(recovered["run-a"].error, ModuleNotFoundError)
    assert module in str(recovered["run-b"].error)
    assert str(recovered["run-c"].error) == "run 'run-c' does not say where its workflow is"
    assert {r.status for r in journal.list_runs()} == {"interrupted"}


# -- module targets -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["module", "package"])
def test_a_module_that_starts_a_loop_on_import_is_refused_before_it_is_imported(
    journal: Journal, files: Files, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    package = f"kagura_script_pkg_{uuid.uuid4().hex[:8]}"
    (files.root / package).mkdir()
    init = files.root / package / "__init__.py"
    jobs = files.root / package / "jobs.py"
    if where == "module":
        init.write_text("", encoding="utf-8")
        jobs.write_text(files.source("asyncio.run(main())"), encoding="utf-8")
        culprit = jobs
    else:  # the package's __init__ runs first when the module is imported
        init.write_text(files.source("asyncio.run(main())"), encoding="utf-8")
        jobs.write_text("from . import report\n", encoding="utf-8")
        culprit = init
    monkeypatch.syspath_prepend(str(files.root))
    target = f"{package}.jobs:report"
    run_id = failed_run(journal, target)
    try:
        with pytest.raises(UsageError) as refused:
            import_target(target)
        assert f"{package}.jobs" not in sys.modules
        if where == "package":
            assert package not in sys.modules  # refused before its __init__ ran
    finally:
        for name in (package, f"{package}.jobs"):
            sys.modules.pop(name, None)

    message = str(refused.value)
    name = package if where == "package" else f"{package}.jobs"
    assert f"from module {name} ({culprit}): its top-level code starts an event loop" in message
    line = line_of(culprit, "asyncio.run(main())")
    assert f"  {culprit}:{line}: asyncio.run(main())" in message
    assert files.ledger_lines() == []
    assert run_ids(journal) == [run_id]


# -- the dynamic guard: what the static check cannot see -----------------------------------------

HELPER = '''
import asyncio


def start_reports(workflow) -> str:
    """Runs the workflow: a script's main code, moved into another module."""
    return asyncio.run(workflow.run("tides"))
'''


@pytest.mark.parametrize("swallowed", [False, True], ids=["raised", "caught-by-the-module"])
def test_a_run_started_by_a_helper_while_the_module_loads_is_refused(
    journal: Journal, files: Files, monkeypatch: pytest.MonkeyPatch, swallowed: bool
) -> None:
    suffix = uuid.uuid4().hex[:8]
    helper, jobs = f"kagura_script_helper_{suffix}", f"kagura_script_jobs_{suffix}"
    (files.root / f"{helper}.py").write_text(HELPER, encoding="utf-8")
    call = f"{helper}.start_reports(report)"
    main_code = f"try:\n    {call}\nexcept Exception:\n    note('caught')" if swallowed else call
    path = files.root / f"{jobs}.py"
    path.write_text(f"import {helper}\n" + files.source(main_code), encoding="utf-8")
    monkeypatch.syspath_prepend(str(files.root))
    run_id = failed_run(journal, f"{jobs}:report")
    try:
        with pytest.raises(UsageError) as refused:
            import_target(f"{jobs}:report")
    finally:
        for name in (helper, jobs):
            sys.modules.pop(name, None)

    message = str(refused.value)
    assert message.startswith(
        f"workflow 'report' started a durable run while kagura was importing {jobs} to load "
        f"workflow 'report' (to resume or replay a run of it): code that runs on import "
        f"started it, so loading the workflow would start the script again, as a new run."
    )
    line = line_of(path, f"    {call}" if swallowed else call)
    assert f"  started by the module-level code at {path}:{line}: {call}" in message
    assert 'under `if __name__ == "__main__":`' in message and "resume the run again" in message
    # The module's code ran up to the call, which was refused before the run started.
    assert files.ledger_lines() == (["imported", "caught", "loaded"] if swallowed else ["imported"])
    assert run_ids(journal) == [run_id]
    assert _script.loads_in_progress == 0


PLAIN_HELPER = '''
import asyncio

from kagura import agent, workflow


@agent(model="fake/echo")
async def draft(topic: str) -> str:
    """Draft {{ topic }}."""


@workflow
async def outline(topic: str) -> str:
    return topic


def call_agent() -> str:
    return asyncio.run(draft("tides"))


def start_plain_workflow() -> str:
    return asyncio.run(outline("tides"))
'''


@pytest.mark.parametrize(
    ("call", "refused"),
    [
        ("call_agent()", "agent 'draft' was called while kagura was importing"),
        ("start_plain_workflow()", "workflow 'outline' was started while kagura was importing"),
    ],
)
def test_an_agent_call_or_a_plain_workflow_started_while_the_module_loads_is_refused(
    journal: Journal, files: Files, monkeypatch: pytest.MonkeyPatch, call: str, refused: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    helper, jobs = f"kagura_script_plain_{suffix}", f"kagura_script_paid_{suffix}"
    (files.root / f"{helper}.py").write_text(PLAIN_HELPER, encoding="utf-8")
    path = files.root / f"{jobs}.py"
    path.write_text(f"import {helper}\n" + files.source(f"{helper}.{call}"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(files.root))
    run_id = failed_run(journal, f"{jobs}:report")
    try:
        with pytest.raises(UsageError, match=refused):
            import_target(f"{jobs}:report")
    finally:
        for name in (helper, jobs):
            sys.modules.pop(name, None)
    assert files.ledger_lines() == ["imported"]
    assert run_ids(journal) == [run_id]
    assert _script.loads_in_progress == 0


def test_a_script_the_static_check_let_through_is_stopped_by_the_dynamic_guard(
    journal: Journal, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both defences are needed: without the static check, the script's main code does run
    # (up to the start of the run, refused).
    monkeypatch.setattr(_execute, "check_source", lambda location, target: None)
    script = files.script("asyncio.run(main())")
    run_id = failed_run(journal, f"{script}:report")
    with pytest.raises(UsageError, match="workflow 'report' started a durable run while kagura"):
        import_target(f"{script}:report")
    assert files.ledger_lines() == ["imported", "main"]
    assert run_ids(journal) == [run_id]


def test_check_not_loading_refuses_only_work_started_by_the_import() -> None:
    _script.check_not_loading("agent 'draft' was called")  # no import in progress: nothing
    other_thread: list[BaseException | None] = []

    def elsewhere() -> None:
        try:
            _script.check_not_loading("agent 'draft' was called")
            other_thread.append(None)
        except BaseException as error:  # reported by the assertion below
            other_thread.append(error)

    refused = "agent 'draft' was called while kagura was importing /srv/app/jobs.py"
    with (
        pytest.raises(UsageError, match=refused),
        _script.loading_target("/srv/app/jobs.py:report"),
    ):
        # Another thread's work, running while this thread imports, is not refused.
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert other_thread == [None]
        _script.check_not_loading("agent 'draft' was called")
    assert _script.loads_in_progress == 0
    _script.check_not_loading("agent 'draft' was called")


# -- through the command line ---------------------------------------------------------------------


def child_env(db: str, **extra: str) -> dict[str, str]:
    """The environment of a subprocess on this test's store (which records no spans: faster)."""
    return {**os.environ, "KAGURA_DB": db, "KAGURA_RECORD": "0", **extra}


def kagura(db: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kagura.cli", *args, "--db", db],
        env=child_env(db),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_kagura_runs_resume_refuses_an_unguarded_script_and_resumes_it_once_guarded(
    db: str, journal: Journal, files: Files
) -> None:
    # The script runs as scripts do, and its run fails at the publish step.
    script = files.script("asyncio.run(main())")
    files.flag.touch()
    first = subprocess.run(
        [sys.executable, str(script)],
        env=child_env(db),
        cwd=files.root,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert first.returncode == 1 and "the CMS is down" in first.stderr
    [record] = journal.list_runs()
    assert (record.status, record.target) == ("failed", f"{script}:report")
    assert files.ledger_lines() == ["imported", "main"]
    files.flag.unlink()

    refused = kagura(db, files.root, "runs", "resume", record.run_id)
    assert refused.returncode == 1, refused.stdout
    line = line_of(script, "asyncio.run(main())")
    assert f"kagura: error: cannot import the workflow of run '{record.run_id}'" in refused.stderr
    assert f"{script}:{line}: asyncio.run(main())" in refused.stderr
    assert '    if __name__ == "__main__":\n        asyncio.run(main())' in refused.stderr
    assert files.ledger_lines() == ["imported", "main"]  # nothing of the script ran
    assert [(r.run_id, r.status, r.attempts) for r in journal.list_runs()] == [
        (record.run_id, "failed", 1)
    ]

    # Done as the message says, the run resumes: once, and no other run starts.
    files.script('if __name__ == "__main__":\n    asyncio.run(main())')
    resumed = kagura(db, files.root, "runs", "resume", record.run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert "published tides" in resumed.stdout
    assert files.ledger_lines() == ["imported", "main", "imported", "loaded", "published tides"]
    assert [(r.run_id, r.status, r.attempts) for r in journal.list_runs()] == [
        (record.run_id, "completed", 2)
    ]


def test_the_readme_durable_example_is_a_resumable_script(
    db: str, journal: Journal, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [example] = [
        block
        for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
        if "@workflow(durable=True)" in block
    ]
    script = tmp_path / "article.py"
    script.write_text(example, encoding="utf-8")
    assert _script.import_time_calls(example, str(script)) == []

    ran = subprocess.run(
        [sys.executable, str(script)],
        env=child_env(db, KAGURA_MODEL="fake"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    [record] = journal.list_runs()
    assert record.status == "completed" and record.target == f"{script.resolve()}:article"
    try:
        assert cli_main(["runs", "resume", record.run_id, "--db", db]) == 0
    finally:
        sys.modules.pop("kagura_resumed_main", None)
    assert "has already completed" in capsys.readouterr().err


def test_a_workflow_defined_outside_any_file_is_said_to_be_resumable_only_from_its_code() -> None:
    # What a run started from an interactive session is journaled under.
    with pytest.raises(UsageError, match=r"not in a file .* with review\.resume\(run_id\)"):
        import_target("__main__:review")
