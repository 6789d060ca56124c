"""Durable workflow runs: resume after a crash without repeating paid LLM calls.

``@workflow(durable=True)`` journals each completed agent call, tool call and :func:`step` of a
run in the event store, committed before the workflow sees its result. ``await wf.run(...,
run_id="order-42")`` is idempotent per run id, and ``await wf.resume(run_id)`` (or ``kagura runs
resume ID``) finishes a run in any process, taking journaled steps from the journal.
:func:`recover` (``kagura runs recover``) resumes every interrupted run at once, and :func:`replay`
runs a finished run again against its journal alone. A run is
interrupted when its process is known gone (at once, on the host that ran it) or its lease has
run out (``KAGURA_LEASE_SECONDS``, default 30); a process that lost its lease commits nothing more.
"""

from ._execute import Recovered, Resumed, recover, replay, resume_run
from ._journal import Journal, RunRecord, StepRecord, journal_for, lease_seconds
from ._run import DurableRun, step

__all__ = [
    "DurableRun",
    "Journal",
    "Recovered",
    "Resumed",
    "RunRecord",
    "StepRecord",
    "journal_for",
    "lease_seconds",
    "recover",
    "replay",
    "resume_run",
    "step",
]
